"""DPO under DDP (issue 13 point 3): two processes (torchrun, CPU, gloo) with 2 pairs each give the update of one
process with the 4 pairs, to 1e-5 relative + 1e-6 absolute on the final weights (the supervised DDP test's bound).
The reference log-probs are precomputed (process 0 computes and writes them, the other waits and reads them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_dpo import dpo_flags, dpo_workspace
from vlm.train.config import RunConfig
from vlm.train.run import run

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_give_the_update_of_one(tmp_path):
    ws = dpo_workspace(tmp_path / "ws")
    flags = ("--max_steps", "3", "--learning_rate", "5e-2", "--lr_scheduler_type", "constant", "--optim", "sgd",
             "--train_sampling_strategy", "sequential", "--save_strategy", "no", "--precompute_ref_log_probs", "True")
    run(RunConfig.from_flags(dpo_flags(ws, tmp_path / "one", *flags, "--per_device_train_batch_size", "4")))
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                *dpo_flags(ws, tmp_path / "two", *flags, "--per_device_train_batch_size", "2")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(Path(ws["llm"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    # the runs did move the weights (the comparison is not of two untouched models)
    assert start.keys() <= a.keys()  # the LLM's keys, as the model folder stores them
    assert any(not torch.allclose(a[k], start[k], rtol=1e-4, atol=1e-5) for k in start)
