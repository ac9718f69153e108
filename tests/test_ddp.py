"""Multi-process training: `train` under torchrun with DistributedDataParallel (2 CPU processes, gloo)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mvae_course.config import preset

SCRIPT = """
import os
import sys
from pathlib import Path

import torch

from mvae_course.config import Config
from mvae_course.train import train

out = Path(sys.argv[2])
result = train(Config.load(sys.argv[1]), out / "run", progress=False, data_dir=out / "data")
torch.save(result.model.state_dict(), out / f"weights-rank{os.environ['RANK']}.pt")
"""


@pytest.mark.slow
def test_two_processes_train_the_same_weights_and_lower_the_loss(tmp_path):
    cfg = preset("tiny").replace(
        data={"n_train": 64, "n_val": 32},
        train={"batch_size": 8, "max_steps": 8, "warmup_steps": 2, "kl_warmup_steps": 4, "eval_every": 8,
               "ckpt_every": 4, "log_every": 2, "device": "cpu"},
    )
    cfg.save(tmp_path / "config.json")
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "script.py"), str(tmp_path / "config.json"), str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    w0, w1 = (torch.load(tmp_path / f"weights-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # DDP kept the replicas in step
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["step"] == 8 and last["world_size"] == 2
    assert all(torch.equal(last["model"][k], w0[k]) for k in w0)

    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [(int(r["step"]), r["split"]) for r in rows]
    assert len(steps) == len(set(steps))  # only rank 0 logs
    val = [float(r["loss"]) for r in rows if r["split"] == "val"]
    assert len(val) == 2 and val[-1] < val[0]
    # 2 processes x 8 images per step: an epoch of 64 images is 4 steps
    assert [int(r["epoch"]) for r in rows if r["split"] == "train"] == [0, 0, 1, 1]
