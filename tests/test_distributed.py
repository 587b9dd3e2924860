"""The distributed paths: ZeRO-3's vision path on text-only ranks, train.sh's torchrun line, and DeepSpeed
ZeRO-2/ZeRO-3 and FSDP through the Trainer on 2 CPU processes (gloo) against the single process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


# -- the vision path of a text-only batch --------------------------------------------------------------------

def _text_batch(tokenizer):
    ids = torch.tensor([tokenizer("What color is the circle? red", add_special_tokens=False)["input_ids"]])
    return ids, ids.clone()


def _loss_logits_grads(model, ids, labels):
    """Loss, gradients and vision-tower calls of a training forward with labels, and the logits of one without
    (with labels the training forward computes the loss without full logits, vlm.llm.loss)."""
    model.zero_grad(set_to_none=True)
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    logits = model(input_ids=ids).logits.detach()
    return loss.detach(), logits, grads, len(calls)


@pytest.mark.parametrize("tower", ["frozen", "trainable"])
def test_zero3_path_runs_the_whole_vision_path_and_adds_exactly_zero(tower):
    from inference_helpers import tiny_model

    model, tokenizer, _ = tiny_model()
    model.train()
    if tower == "trainable":
        model.vision_tower.set_trainable(True)
    ids, labels = _text_batch(tokenizer)
    assert model.vision_on_text_only is False  # the default: DDP / single process
    cheap_loss, cheap_logits, cheap_grads, cheap_calls = _loss_logits_grads(model, ids, labels)
    model.vision_on_text_only = True
    loss, logits, grads, calls = _loss_logits_grads(model, ids, labels)

    assert torch.equal(loss, cheap_loss) and torch.equal(logits, cheap_logits)  # bitwise: an exact zero was added
    assert calls == 1  # ZeRO-3: the tower ran on the dummy image, frozen or not
    assert cheap_calls == (0 if tower == "frozen" else 1)  # the cheap path skips a frozen tower
    vision = [n for n in grads if n.startswith(("vision_tower.", "mm_projector."))]
    assert any(n.startswith("mm_projector.") for n in vision)
    assert (tower == "trainable") == any(n.startswith("vision_tower.") for n in vision)
    for name in vision:  # every trainable vision/projector parameter has a gradient, and it is zero
        assert grads[name] is not None and torch.count_nonzero(grads[name]) == 0, name
    for name in grads:
        if name not in vision:
            assert torch.equal(grads[name], cheap_grads[name]), name


def test_zero3_path_also_in_evaluation_but_not_while_decoding():
    from inference_helpers import tiny_model

    model, tokenizer, _ = tiny_model()
    model.vision_on_text_only = True
    calls = []
    model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    ids, _ = _text_batch(tokenizer)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert calls == [1]  # the prefill ran it (another rank may encode images there), the 2 decoding steps did not


@pytest.mark.parametrize("zero3", [True, False])
def test_trainer_chooses_the_path_from_zero3(zero3, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from inference_helpers import tiny_model
    from vlm.train import trainer as trainer_module

    model, tokenizer, processor = tiny_model()
    model.vision_on_text_only = not zero3
    monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda: zero3)
    trainer_module.VLMTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                  report_to="none"),
                              processing_class=tokenizer, image_processor=processor)
    assert model.vision_on_text_only is zero3


# -- train.sh -------------------------------------------------------------------------------------------------

def _train_sh(tmp_path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """train.sh with a fake `torchrun` first on PATH that prints the arguments it was given, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                            "NPROC_PER_NODE", "VLM_TRAIN_DRY_RUN")}
    env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(REPO / "train.sh"), *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path)


def test_train_sh_single_node_is_standalone(tmp_path):
    for env in ({}, {"NNODES": "1", "MASTER_ADDR": "10.0.0.1"}):
        proc = _train_sh(tmp_path, env, "--data_path", "my data.json")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == ["--standalone", "--nproc_per_node", "1", str(REPO / "train.py"),
                                            "--data_path", "my data.json"]


def test_train_sh_multi_node_passes_the_rendezvous_to_torchrun(tmp_path):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501", "NPROC_PER_NODE": "8"}
    proc = _train_sh(tmp_path, env, "--deepspeed", "zero3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
                                        "--master_port", "29501", "--nproc_per_node", "8", str(REPO / "train.py"),
                                        "--deepspeed", "zero3"]
    dry = _train_sh(tmp_path, {**env, "VLM_TRAIN_DRY_RUN": "1"}, "--deepspeed", "zero3")
    assert dry.returncode == 0 and dry.stdout.split() == ["torchrun", *proc.stdout.split()]


def test_train_sh_multi_node_without_master_is_one_line(tmp_path):
    proc = _train_sh(tmp_path, {"NNODES": "2", "NODE_RANK": "0"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("train.sh: error: NNODES=2 needs MASTER_ADDR")


# -- DeepSpeed ZeRO-2/ZeRO-3 and FSDP on 2 CPU processes -----------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny LLM + vision tower and a mixed text/image dataset in which, read in order with one sample per
    process, one process's batch has no image while the other's has one."""
    from vlm.data.synth import generate_shapes_dataset
    from vlm.tiny import save_tiny_components

    root = tmp_path_factory.mktemp("dist")
    data = generate_shapes_dataset(root / "data", n_train=8, n_eval=2, image_size=32, seed=0)
    records = json.loads(Path(data["train"]).read_text())
    for i in range(0, 8, 2):
        records[i] = {"id": f"text{i}", "conversations": [
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red " * (1 + i)}]}
    (root / "mixed.json").write_text(json.dumps(records))
    texts = [turn["value"] for r in records for turn in r["conversations"]]
    llm, vision = save_tiny_components(root / "models", texts)
    return {"root": root, "llm": llm, "vision": vision, "data": str(root / "mixed.json"),
            "images": data["image_folder"]}


def _flags(ws, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", ws["llm"], "--vision_tower", ws["vision"], "--data_path", ws["data"],
            "--image_folder", ws["images"], "--output_dir", str(out), "--report_to", "none", "--use_cpu", "True",
            "--dataloader_num_workers", "0", "--seed", "0", "--logging_steps", "1", "--save_strategy", "no",
            "--max_steps", "3", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--optim", "sgd",
            "--train_sampling_strategy", "sequential", *extra]


LORA = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
        "--mm_projector_lr", "1e-3")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _single(ws, out: Path, *extra: str) -> Path:
    _run([sys.executable, "train.py", *_flags(ws, out, "--per_device_train_batch_size", "2", *extra)])
    return out


def _two_processes(ws, out: Path, *extra: str) -> Path:
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                 *_flags(ws, out, "--per_device_train_batch_size", "1", *extra)])
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="module")
def single_run(workspace):
    return _single(workspace, workspace["root"] / "single")


def _assert_same_weights(a_file: Path, b_file: Path) -> None:
    """Equal to 1e-6 (measured: at most 7.5e-9 apart; summation order differs between 1 and 2 processes)."""
    a, b = load_file(a_file), load_file(b_file)
    assert set(a) == set(b), set(a) ^ set(b)  # tied weights stored once, as the single process does
    for key in a:
        assert b[key].numel() == a[key].numel() > 0, key  # full tensors, not empty ZeRO-3 shards
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def _assert_trained(start_llm: str, run: Path) -> None:
    before = load_file(Path(start_llm) / "model.safetensors")
    after = load_file(run / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)  # the comparison means something


def test_zero2_two_processes_update_equals_single_process(workspace, single_run, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra (pip install -e .[dev])")
    # Global batch 2 in both; with 2 processes one rank's batch of each step is text-only (see `workspace`).
    run = _two_processes(workspace, tmp_path / "zero2", "--deepspeed", "zero2")
    _assert_same_weights(single_run / "model.safetensors", run / "model.safetensors")
    _assert_trained(workspace["llm"], run)


def test_zero3_lora_run_saves_the_real_adapter(workspace, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra (pip install -e .[dev])")
    single = _single(workspace, tmp_path / "single", *LORA)
    zero3 = _two_processes(workspace, tmp_path / "zero3", *LORA, "--deepspeed", "zero3")
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        assert set(load_file(zero3 / name)) == set(load_file(single / name)), name
        _assert_same_weights(single / name, zero3 / name)
    adapter = load_file(zero3 / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # trained (PEFT starts B at zero), not empty shards
    non_lora = load_file(zero3 / "non_lora_trainables.safetensors")
    assert any(k.startswith("vision_tower.") for k in non_lora)  # frozen tensors, gathered from their shards


@pytest.mark.parametrize("engine", [("--deepspeed", "zero3"), ("--fsdp", "full_shard")], ids=["zero3", "fsdp"])
def test_two_processes_equal_single_process_and_resume_bitwise(workspace, single_run, tmp_path, engine):
    """The update equals the single process's (one rank's batch text-only each step). Every rank writes into
    the staged checkpoint (RNG states, DeepSpeed's shards); a rerun after losing the last checkpoint resumes
    from the one before and ends bitwise equal; a rerun of the finished run rewrites the same final model."""
    import shutil

    if engine[0] == "--deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra (pip install -e .[dev])")
    saving = ("--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2")  # the last flag wins
    full = _two_processes(workspace, tmp_path / "full", *engine, *saving)
    _assert_same_weights(single_run / "model.safetensors", full / "model.safetensors")
    _assert_trained(workspace["llm"], full)
    checkpoint = full / "checkpoint-3"
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "model.safetensors"} <= set(
        os.listdir(checkpoint))
    if engine[0] == "--deepspeed":
        assert len(list((checkpoint / "global_step3").glob("*optim_states.pt"))) == 2  # one shard per rank
    assert os.listdir(full / ".incomplete") == []

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for name in ("checkpoint-3", "model.safetensors", "config.json"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    _two_processes(workspace, resumed, *engine, *saving)
    assert "resuming from" in (resumed / "stdout.txt").read_text()
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # A rerun of the finished run writes its final model from the last checkpoint, without training.
    (resumed / "model.safetensors").unlink()
    _two_processes(workspace, resumed, *engine, *saving)
    assert "training already finished at step 3" in (resumed / "stdout.txt").read_text()
    c = load_file(resumed / "model.safetensors")
    assert c.keys() == a.keys()
    for key in a:
        assert torch.equal(a[key], c[key]), key
