"""Run by test_distributed.py under torchrun: two gloo ranks prune and fine-tune with DDP.

Each rank has its own data, so each rank's own Taylor ranking differs; both must still end with the
same pruned model. Writes rank<N>.pt into the folder given as argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
import fxprune  # noqa: E402
from fxprune.pipeline import analyze  # noqa: E402
from conftest import Net, quadrant_data  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net().eval()
    x, y = quadrant_data(128, seed=1 + rank)
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]

    def finetune(model: torch.nn.Module) -> None:
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(ddp(xb), yb).backward()
            opt.step()

    a = analyze(net, x[:1])
    own = fxprune.Taylor(data[:2], F.cross_entropy).scores(a.deps, a.gm)
    pruned, history = fxprune.prune_iteratively(
        net, ratio=0.5, steps=2, finetune=finetune, selector="taylor", calibration=data[:2], loss_fn=F.cross_entropy,
        example_inputs=x[:1], progress=False,
    )
    torch.save(
        {"state": pruned.state_dict(), "params": {k: k in dict(pruned.named_parameters()) for k in pruned.state_dict()},
         "plan": pruned.meta["fxprune"]["plan"], "own_scores": own,
         "gflops": [s.gflops for s in history.steps]},
        out / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
