"""DPO under DDP (issue 13 point 3): two processes (torchrun, CPU, gloo) with 2 pairs each give the update of one
process with the 4 pairs, to 1e-5 relative + 1e-6 absolute on the saved weights (the supervised DDP test's bound):
- full weights with precomputed reference log-probs (process 0 computes and writes them, the other waits and
  reads them);
- LoRA, whose reference is the model itself with its adapters disabled and the projector at its start values,
  on every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_dpo import dpo_flags, dpo_workspace
from vlm.train.config import RunConfig
from vlm.train.run import run

REPO = Path(__file__).resolve().parents[1]
COMMON = ("--max_steps", "3", "--learning_rate", "5e-2", "--lr_scheduler_type", "constant", "--optim", "sgd",
          "--train_sampling_strategy", "sequential", "--save_strategy", "no")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return dpo_workspace(tmp_path_factory.mktemp("dpo_ddp"))


def _torchrun(flags: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor the run saved (model folder or LoRA run), keyed by file and name."""
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


# LoRA dropout off: its random masks are drawn differently by one process and by two
@pytest.mark.parametrize("setup", [("--precompute_ref_log_probs", "True"),
                                   ("--lora_enable", "True", "--lora_r", "8", "--lora_dropout", "0")],
                         ids=["full_precomputed", "lora"])
def test_two_processes_give_the_update_of_one(workspace, tmp_path, setup):
    run(RunConfig.from_flags(dpo_flags(workspace, tmp_path / "one", *COMMON, *setup,
                                       "--per_device_train_batch_size", "4")))
    two = _torchrun(dpo_flags(workspace, tmp_path / "two", *COMMON, *setup, "--per_device_train_batch_size", "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    # the runs did move the weights (the comparison is not of two untouched models)
    if "--lora_enable" in setup:
        assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # adapters start at lora_B = 0
    else:
        start = load_file(Path(workspace["llm"]) / "model.safetensors")
        assert any(not torch.allclose(a[f"model.safetensors:{k}"], start[k], rtol=1e-4, atol=1e-5) for k in start)
