"""Atomic checkpoints (vlm.train.checkpointing): complete under the final name, or not there at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm.train import checkpointing
from vlm.train.checkpointing import STAGING_DIR, staged_folder, staging_path
from vlm.train.run_folder import find_resume_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _write(folder: str, **files: bytes) -> None:
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_complete_folder_appears_in_one_rename_after_fsync(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    fd_paths: dict[int, str] = {}
    real_open = os.open

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        fd_paths[fd] = os.fspath(path)
        return fd

    monkeypatch.setattr(checkpointing.os, "open", tracking_open)
    monkeypatch.setattr(checkpointing.os, "fsync", lambda fd: (events.append(("fsync", fd_paths[fd])), real_fsync(fd)))
    monkeypatch.setattr(checkpointing.os, "replace",
                        lambda a, b: (events.append(("replace", os.fspath(b))), real_replace(a, b)))
    final = tmp_path / "checkpoint-4"
    with staged_folder(str(final)) as folder:
        assert folder == str(tmp_path / STAGING_DIR / "checkpoint-4")
        _write(folder, **{"model.safetensors": b"w" * 100, "trainer_state.json": b"{}"})
        os.makedirs(os.path.join(folder, "global_step4"))
        _write(os.path.join(folder, "global_step4"), shard=b"s")
        assert not final.exists()  # nothing under the final name while writing
    assert sorted(p.name for p in final.iterdir()) == ["global_step4", "model.safetensors", "trainer_state.json"]
    assert (final / "model.safetensors").read_bytes() == b"w" * 100
    assert (final / "global_step4" / "shard").read_bytes() == b"s"
    assert not (tmp_path / STAGING_DIR / "checkpoint-4").exists()
    # every file was flushed before the rename, and the parent folder after it
    rename = events.index(("replace", str(final)))
    flushed = {os.path.basename(path) for kind, path in events[:rename] if kind == "fsync"}
    assert {"model.safetensors", "trainer_state.json", "shard"} <= flushed
    assert ("fsync", str(tmp_path)) in events[rename:]


def test_exception_mid_save_leaves_no_checkpoint(tmp_path):
    older = tmp_path / "checkpoint-2"
    older.mkdir()
    _write(str(older), **{"model.safetensors": b"old"})
    with pytest.raises(OSError, match="disk full"):
        with staged_folder(str(tmp_path / "checkpoint-4")) as folder:
            _write(folder, **{"model.safetensors": b"half"})
            raise OSError("disk full")
    assert not (tmp_path / "checkpoint-4").exists()
    assert not Path(staging_path(str(tmp_path / "checkpoint-4"))).exists(), "the half-written staging folder is removed"
    assert list_checkpoints(str(tmp_path)) == [str(older)]
    assert _files(older) == {"model.safetensors": b"old"}


def test_replacing_a_checkpoint_keeps_the_old_one_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "checkpoint-4"
    final.mkdir()
    _write(str(final), **{"model.safetensors": b"first", "extra.bin": b"x"})
    with pytest.raises(RuntimeError):
        with staged_folder(str(final)) as folder:
            _write(folder, **{"model.safetensors": b"sec"})
            raise RuntimeError("killed")
    assert _files(final) == {"extra.bin": b"x", "model.safetensors": b"first"}  # untouched
    with staged_folder(str(final)) as folder:
        _write(folder, **{"model.safetensors": b"second"})
    assert _files(final) == {"model.safetensors": b"second"}  # the new one whole, nothing of the old
    assert sorted(os.listdir(tmp_path / STAGING_DIR)) == []


def test_sigkill_mid_save_leaves_no_torn_checkpoint_and_the_next_save_starts_clean(tmp_path):
    from safetensors.torch import save_file

    older = tmp_path / "checkpoint-2"
    older.mkdir()
    save_file({"w": torch.zeros(2)}, str(older / "model.safetensors"))  # an intact checkpoint to resume from
    _write(str(older), **{"trainer_state.json": b"{}"})
    script = (
        "import os, signal, sys\n"
        "from vlm.train.checkpointing import staged_folder\n"
        "with staged_folder(sys.argv[1]) as folder:\n"
        "    open(os.path.join(folder, 'model.safetensors'), 'wb').write(b'half')\n"
        "    open(os.path.join(folder, 'stale.bin'), 'wb').write(b'stale')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "checkpoint-4")], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "checkpoint-4").exists()
    assert (tmp_path / STAGING_DIR / "checkpoint-4" / "stale.bin").exists()  # the killed attempt's leftovers
    assert list_checkpoints(str(tmp_path)) == [str(older)]  # staged folders are never listed
    assert find_resume_checkpoint(str(tmp_path)) == str(older)
    with staged_folder(str(tmp_path / "checkpoint-4")) as folder:  # the rerun's save at the same step
        _write(folder, **{"model.safetensors": b"full", "trainer_state.json": b"{}"})
    assert _files(tmp_path / "checkpoint-4") == {"model.safetensors": b"full", "trainer_state.json": b"{}"}


def test_barriers_around_the_writes_and_only_the_writer_renames(tmp_path):
    calls: list[str] = []
    final = tmp_path / "checkpoint-1"
    (tmp_path / STAGING_DIR / "checkpoint-1").mkdir(parents=True)  # as the writer process made it
    with staged_folder(str(final), is_writer=False, barrier=lambda: calls.append("barrier")) as folder:
        calls.append("write")
        _write(folder, **{"rng_state_1.pth": b"r"})
    assert calls == ["barrier", "write", "barrier", "barrier"]
    assert not final.exists()  # another process renames it
    assert (tmp_path / STAGING_DIR / "checkpoint-1" / "rng_state_1.pth").exists()


# -- through the trainer -----------------------------------------------------------------------------------

def _text_dataset(tokenizer, n: int = 8) -> list[dict]:
    examples = []
    for i in range(n):
        ids = tokenizer(f"What color is it? red {i}", add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids),
                         "attention_mask": torch.ones(len(ids), dtype=torch.long)})
    return examples


def _tiny_trainer(tmp_path, **args):
    from transformers import TrainingArguments

    sys.path.insert(0, str(Path(__file__).parent))
    from inference_helpers import tiny_model

    from vlm.data.collate import DataCollator
    from vlm.train.trainer import VLMTrainer

    model, tokenizer, processor = tiny_model()
    training_args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none",
                                      per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="steps",
                                      save_steps=1, max_steps=3, logging_steps=1, dataloader_num_workers=0,
                                      disable_tqdm=True, **args)
    return VLMTrainer(model=model.train(), args=training_args, train_dataset=_text_dataset(tokenizer),
                      processing_class=tokenizer, data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id),
                      image_processor=processor)


def test_trainer_exception_mid_checkpoint_keeps_the_previous_complete_one(tmp_path, monkeypatch):
    from transformers import Trainer

    trainer = _tiny_trainer(tmp_path)
    real = Trainer._save_rng_state

    def failing_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(28, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", failing_at_step_2)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    run = tmp_path / "run"
    assert [os.path.basename(p) for p in list_checkpoints(str(run))] == ["checkpoint-1"]
    assert {"model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "config.json", "tokenizer.json"} <= set(os.listdir(run / "checkpoint-1"))
    assert not (run / STAGING_DIR / "checkpoint-2").exists()
    assert find_resume_checkpoint(str(run)) == str(run / "checkpoint-1")


def test_trainer_state_starts_in_init_and_tokens_per_s_is_logged(tmp_path):
    trainer = _tiny_trainer(tmp_path, save_total_limit=1)
    assert trainer.token_rate.tokens == 0 and trainer.token_rate.since is None
    assert not hasattr(trainer, "_staging")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["tokens_per_s"] > 0 for h in logged[1:])
    run = tmp_path / "run"
    assert [os.path.basename(p) for p in list_checkpoints(str(run))] == ["checkpoint-3"]  # save_total_limit
    assert os.listdir(run / STAGING_DIR) == []
