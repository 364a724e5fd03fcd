"""What the pruned model's code generator is worth: FX's attribute chains against ``_modules`` lookups.

For each model (random weights, eval mode, batch 1, 2 CPU threads unless --threads) this compiles
``ratio=0.5`` with the default settings, makes a module over the same weights whose code is FX's own
(``fxprune.core.codegen.fx_code``: ``self.layer1.0.conv1``, each step through ``nn.Module.__getattr__``), and
times the original, that module and the result (``self._modules['layer1']...``, fxprune/codegen.py) in
turns (``fxprune.latency.timing.measure_in_turns``). It prints each one's median latency as a ratio to the
original's, and the milliseconds the code generator saves.

    python benchmarks/codegen.py
    python benchmarks/codegen.py --models mobilenet_v2,regnet_y_400mf --repeat 41
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from tabulate import tabulate

import fxprune
from fxprune.core.codegen import fx_code
from fxprune.latency.timing import measure_in_turns

MODELS = "mobilenet_v2,efficientnet_b0,resnet50,mobilenet_v3_large,regnet_y_400mf,shufflenet_v2_x1_0,resnet18,squeezenet1_1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--repeat", type=int, default=31, help="timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        pruned = fxprune.compile(model, example_inputs=x, ratio=0.5, verify=False)
        original, fx_plain, direct = measure_in_turns([model, fx_code(pruned), pruned], (x,), repeat=args.repeat)
        rows.append([name, f"{original.median_ms:.1f}", f"{fx_plain.median_ms / original.median_ms:.3f}",
                     f"{direct.median_ms / original.median_ms:.3f}", f"{fx_plain.median_ms - direct.median_ms:.2f}"])
        print(" ".join(rows[-1]), flush=True)
    print(tabulate(rows, headers=["model", "original ms", "FX's code", "_modules (default)", "ms saved"], tablefmt="github"))


if __name__ == "__main__":
    main()
