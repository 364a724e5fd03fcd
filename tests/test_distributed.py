"""Under torch.distributed every rank ends with the same plan: torchrun, 2 gloo CPU ranks, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_two_ranks_end_with_identical_pruned_models(tmp_path):
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # each rank's own data ranks the channels differently ...
    own = [r["own_scores"] for r in ranks]
    assert any(not torch.allclose(own[0][g], own[1][g], rtol=1e-3, atol=1e-6) for g in own[0])  # by more than rounding
    # ... yet both ranks hold the same plan and the same pruned model after two prune/fine-tune steps
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["gflops"] == ranks[1]["gflops"] and ranks[0]["gflops"][2] < ranks[0]["gflops"][0]
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0.keys() == s1.keys() == set(ranks[0]["params"])
    for k in s0:
        assert s0[k].shape == s1[k].shape, k
        # DDP keeps parameters equal; BatchNorm's running statistics are synced at the start of each
        # forward, so the last local batch leaves them rank-specific (as in any DDP training)
        if ranks[0]["params"][k]:
            torch.testing.assert_close(s0[k], s1[k], rtol=1e-6, atol=1e-6, msg=k)
