"""What does coarse ranking save? Gradual Taylor pruning with coarse ranking against a separate ranking
pass per step, side by side, on the Fashion-MNIST CNNs of reproduce.py, with the same budgets.

Per architecture, a baseline is trained briefly (time, not accuracy, is measured here), then four
strategies prune it to 75% FLOPs reduction in ``--steps`` steps, taking turns ``--repeats`` times (the
order rotates each repeat, so a host whose speed drifts slows each alike): taylor with coarse ranking,
taylor with a separate ranking pass over ``--calibration-images`` images per step, bn_taylor with
coarse ranking (|gamma * dL/dgamma| read from fine-tuning's own gradients: no pass, no taps), and
uniform (no ranking at all: the floor). The table gives medians of the total pruning time (ranking, selecting,
rewriting, fine-tuning), of the ranking time and of the fine-tuning time, coarse's share of separate's
ranking, and fine-tuning time relative to uniform's (bn_taylor and uniform prune to the same widths, so
the difference is what its gradient hooks cost; taylor's taps count their own time as ranking).

    python benchmarks/coarse_ranking.py                      # about 15 minutes on 2 cores
    python benchmarks/coarse_ranking.py --calibration-images 6000
    python benchmarks/coarse_ranking.py --strategies "taylor (separate),bn_taylor (coarse),uniform (no ranking)"
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from reproduce import ARCHS, Trainer, calibration_set, fashion_mnist
from tabulate import tabulate

import fxprune

STRATEGIES = {
    "taylor (coarse)": {"selector": "taylor", "coarse": True},
    "taylor (separate)": {"selector": "taylor", "coarse": False},
    "bn_taylor (coarse)": {"selector": "bn_taylor", "coarse": True},
    "uniform (no ranking)": {"selector": "uniform"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path.home() / ".cache" / "fxprune-data")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--install-data", action="store_true", help="apt-get install dataset-fashion-mnist when missing (as root)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--baseline-images", type=int, default=20_000)
    p.add_argument("--finetune-images", type=int, default=6_000, help="fine-tuning images per step (as reproduce.py)")
    p.add_argument("--calibration-images", type=int, default=2_048, help="images of one separate ranking pass (as reproduce.py)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (taylor (separate) and uniform always run)")
    args = p.parse_args()
    names = list(dict.fromkeys(["taylor (separate)", *args.strategies.split(","), "uniform (no ranking)"]))
    torch.set_num_threads(args.threads)
    xtr, ytr, _, _ = fashion_mnist(args.data, args.install_data)
    calibration = calibration_set(xtr, ytr, args.calibration_images)
    rows = []
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        base = ARCHS[arch]()
        Trainer(xtr, ytr, args.baseline_images, 128, 0.05, seed=0)(base)
        base.eval()
        seen: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                kwargs = dict(STRATEGIES[name])
                if kwargs["selector"] == "taylor":
                    kwargs.update(calibration=calibration, loss_fn=F.cross_entropy)
                _, history = fxprune.prune_iteratively(
                    base, ratio=0.75, steps=args.steps, example_inputs=xtr[:1], progress=False,
                    finetune=Trainer(xtr, ytr, args.finetune_images, 128, 0.01, seed=1), **kwargs,
                )
                seen[name].append((history.pruning_s, history.ranking_s, sum(s.finetuning_s for s in history.steps)))
                print(f"{arch} {name} repeat {r}: pruning {history.pruning_s:.1f} s, ranking {history.ranking_s:.2f} s", flush=True)
        median = {name: [statistics.median(v[i] for v in seen[name]) for i in (0, 1, 2)] for name in names}
        separate, floor = median["taylor (separate)"], median["uniform (no ranking)"]
        for name, (total, ranking, tuning) in median.items():
            rows.append([arch, name, f"{total:.1f}", f"{ranking:.2f}", f"{tuning:.2f}", f"{total / separate[0]:.2f}",
                         f"{ranking / separate[1]:.3f}", f"{tuning / floor[2]:.3f}"])
    print(tabulate(rows, headers=["model", "strategy", "pruning s (median)", "ranking s (median)", "fine-tuning s (median)",
                                  "pruning / separate's", "ranking / separate's", "fine-tuning / uniform's"], tablefmt="github"))


if __name__ == "__main__":
    main()
