"""DDP with 2 CPU processes (gloo), launched as users launch it: a script run with Lightning's `ddp` strategy,
which starts the second process itself. (The callback and the metric under 2 processes are checked against one
process in every 2-process cell of tests/test_matrix.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _fit(out: Path, *args: str) -> torch.Tensor:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_penalty_run.py"), str(out), *args],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def test_fisher_penalty_gradients_are_synchronised_under_ddp(tmp_path):
    """Two processes with batch 8 each end where one process with batch 16 ends (the penalty's gradients are
    averaged across ranks like the loss's), and far from the start."""
    single = _fit(tmp_path / "single.pt", "16")
    ddp = _fit(tmp_path / "ddp.pt", "8", "2")
    initial = _fit(tmp_path / "initial.pt", "16", "1", "0")
    assert (single - initial).norm() > 1e-2
    torch.testing.assert_close(ddp, single, rtol=1e-4, atol=1e-5)
