"""The output folder of a run: a finished run stays finished, another run's folder is refused, one writer at a
time, a torn metrics line and a damaged newest checkpoint lose nothing (issue 10, points 1-4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm.data.synth import generate_shapes_dataset
from vlm.tiny import save_tiny_components
from vlm.train.callbacks import plot_loss, read_metrics, truncate_metrics
from vlm.cli.train import main as train_main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    data = generate_shapes_dataset(root / "data", n_train=8, n_eval=2, image_size=32, seed=0)
    with open(data["train"], encoding="utf-8") as f:
        texts = [turn["value"] for r in json.load(f) for turn in r["conversations"]]
    llm, vision = save_tiny_components(root / "models", texts)
    return {"root": root, "llm": llm, "vision": vision, "data": data["train"], "images": data["image_folder"]}


def flags(ws, out, *extra: str, steps: int = 4, lr: str = "1e-2", seed: str = "0") -> list[str]:
    # constant learning rate: one step more always changes the weights
    return ["--model_name_or_path", ws["llm"], "--vision_tower", ws["vision"], "--data_path", ws["data"],
            "--image_folder", ws["images"], "--output_dir", str(out), "--report_to", "none",
            "--dataloader_num_workers", "0", "--use_cpu", "True", "--seed", seed, "--logging_steps", "1",
            "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--learning_rate", lr,
            "--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", "2", *extra]


def checkpoints(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


@pytest.fixture(scope="module")
def reference(ws):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = ws["root"] / "ref"
    assert train_main(flags(ws, out)) == 0
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    return out


def resumable_copy(reference: Path, dest: Path, *, keep: tuple[str, ...] = ("checkpoint-2", "checkpoint-4")) -> Path:
    """A folder as a killed run of the reference's flags leaves it: its record, metrics and the `keep` checkpoints."""
    dest.mkdir()
    for name in ("vlm_run.json", "metrics.jsonl"):
        shutil.copy(reference / name, dest / name)
    for name in keep:
        shutil.copytree(reference / name, dest / name)
    return dest


# -- 1. a finished run ------------------------------------------------------------------------------

def test_rerun_of_a_finished_run_only_rewrites_its_model(ws, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    model = (reference / "model.safetensors").read_bytes()
    metrics = (reference / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train_main(flags(ws, out)) == 0
    assert "training already finished at step 4" in capsys.readouterr().out
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # transformers alone would train and save step 5
    assert (out / "model.safetensors").read_bytes() == model
    assert (out / "metrics.jsonl").read_text() == metrics

    # killed during the final save: a torn model file; the rerun writes it again from the last checkpoint
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 3])
    (out / "config.json").unlink()
    assert train_main(flags(ws, out)) == 0
    assert (out / "model.safetensors").read_bytes() == model
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]


def test_rerun_of_a_finished_lora_run_only_rewrites_its_adapter(ws, tmp_path, capsys):
    out = tmp_path / "lora"
    lora = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--mm_projector_lr", "1e-3")
    assert train_main(flags(ws, out, *lora, steps=2)) == 0
    saved = {n: (out / n).read_bytes() for n in ("adapter_model.safetensors", "non_lora_trainables.safetensors")}
    (out / "adapter_model.safetensors").unlink()  # killed during the final save
    capsys.readouterr()
    assert train_main(flags(ws, out, *lora, steps=2)) == 0
    assert "training already finished at step 2" in capsys.readouterr().out
    assert checkpoints(out) == ["checkpoint-2"]
    assert {n: (out / n).read_bytes() for n in saved} == saved


# -- 2. another run's folder; the lock --------------------------------------------------------------

def test_another_runs_folder_is_refused_naming_the_flags(ws, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert train_main(flags(ws, out, lr="5e-3", seed="1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--learning_rate 0.01 (now 0.005)" in err and "--seed 0 (now 1)" in err
    assert "--overwrite_output_dir" in err

    # a LoRA run into a full run's folder: one line, not a FileNotFoundError from the checkpoint
    assert train_main(flags(ws, out, "--lora_enable", "True", "--lora_r", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lora_enable False (now True)" in err, err
    assert (out / "model.safetensors").read_bytes() == before and checkpoints(out) == ["checkpoint-2", "checkpoint-4"]

    # checkpoints with no record (another tool's, or an older vlm's) are not resumed blindly either
    (out / "vlm_run.json").unlink()
    assert train_main(flags(ws, out)) == 2
    assert "no run record" in capsys.readouterr().err

    # --overwrite_output_dir: the old checkpoints go, the new flags are recorded and trained
    assert train_main(flags(ws, out, "--overwrite_output_dir", "True", steps=2, lr="5e-3", seed="1")) == 0
    assert "removed 2 checkpoint(s)" in capsys.readouterr().out
    assert checkpoints(out) == ["checkpoint-2"]
    record = json.loads((out / "vlm_run.json").read_text())
    assert record["learning_rate"] == 5e-3 and record["seed"] == 1 and record["max_steps"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")[0]] == [1, 2]
    assert (out / "model.safetensors").read_bytes() != before


def test_a_folder_where_nothing_was_saved_takes_new_flags(ws, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # a first attempt that stopped before its first checkpoint (a data error, say)
    (out / "vlm_run.json").write_text(json.dumps({"learning_rate": 0.5, "data_path": "typo.json"}))
    assert train_main(flags(ws, out, steps=2)) == 0
    assert json.loads((out / "vlm_run.json").read_text())["learning_rate"] == 1e-2


def test_a_second_run_into_a_locked_folder_is_refused_and_a_stale_lock_taken_over(ws, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{holder.pid}\n")
        assert train_main(flags(ws, out, steps=2)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and ".lock" in err, err
        assert not checkpoints(out) and not (out / "vlm_run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train_main(flags(ws, out, steps=2)) == 0  # the holder was killed: its lock is stale
    assert f"taking over the lock {out / '.lock'} left by pid {holder.pid}" in capsys.readouterr().out
    assert not (out / ".lock").exists() and (out / "model.safetensors").is_file()


# -- 3. metrics.jsonl -------------------------------------------------------------------------------

def test_torn_metrics_line_and_resume_leave_one_record_per_step(ws, reference, tmp_path, capsys):
    out = resumable_copy(reference, tmp_path / "run", keep=("checkpoint-2",))
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss": 1.2')  # disk full during an append
    capsys.readouterr()
    assert train_main(flags(ws, out)) == 0
    stdout = capsys.readouterr().out
    assert "skipped 1 unreadable line(s)" in stdout and "resuming from" in stdout
    records, bad = read_metrics(out / "metrics.jsonl")
    assert bad == 0 and [r["step"] for r in records] == [1, 2, 3, 4]  # steps 3 and 4 once, not twice
    assert (out / "loss.png").is_file()
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_the_model_is_saved_before_the_plot(ws, tmp_path, monkeypatch):
    import vlm.train.callbacks

    def broken_plot(*args):
        raise OSError("no space left on device")

    monkeypatch.setattr(vlm.train.callbacks, "plot_loss", broken_plot)
    out = tmp_path / "run"
    with pytest.raises(OSError):
        train_main(flags(ws, out, steps=2))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_plot_and_truncation_skip_unreadable_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n[1]\n{"step": 3, "loss": 1.')
    assert plot_loss(str(path), str(tmp_path / "loss.png")) and (tmp_path / "loss.png").is_file()
    assert "skipped 3 unreadable line(s)" in capsys.readouterr().out
    assert truncate_metrics(str(path), 1) == 3
    assert [r["step"] for r in read_metrics(path)[0]] == [1] and read_metrics(path)[1] == 0


def test_plot_sets_no_global_matplotlib_state(tmp_path):
    """The loss plot draws through matplotlib's object API: no backend chosen, pyplot never imported."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    code = ("import sys, matplotlib; from vlm.train.callbacks import plot_loss; "
            f"assert plot_loss({str(metrics)!r}, {str(tmp_path / 'loss.png')!r}); "
            "print(matplotlib.rcParams._get_backend_or_none(), 'matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                                                                                          "MPLBACKEND": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "False"] and (tmp_path / "loss.png").stat().st_size > 1000


def test_demo_settings_that_contradict_the_run_folder_are_one_line(tmp_path, capsys):
    from vlm.cli import run
    from vlm.demo import RUN_SETTINGS_FILE, main as demo_main

    import torch
    from safetensors.torch import save_file

    (tmp_path / "checkpoint-10").mkdir()  # an intact checkpoint of a demo run with other settings
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10, "max_steps": 20}')
    save_file({"w": torch.zeros(1)}, tmp_path / "checkpoint-10" / "model.safetensors")
    (tmp_path / RUN_SETTINGS_FILE).write_text(json.dumps({"n_train": 64}))
    assert run("vlm demo", demo_main, ["--output_dir", str(tmp_path), "--n_train", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"vlm demo: error: {tmp_path} holds a demo run with n_train=64, not 32, so "
                   f"{tmp_path / 'checkpoint-10'} cannot be resumed: pass the same settings, another --output_dir, "
                   "or delete the folder")


# -- 4. a damaged newest checkpoint -----------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "model.safetensors": _truncate,
    "trainer_state.json": lambda p: p.write_text("{garbage"),
    "optimizer.pt": _truncate,
    "rng_state.pth": _truncate,
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(ws, reference, tmp_path, capsys, name):
    out = resumable_copy(reference, tmp_path / "run")
    assert (out / "checkpoint-4" / name).is_file()
    DAMAGE[name](out / "checkpoint-4" / name)
    capsys.readouterr()
    assert train_main(flags(ws, out)) == 0
    stdout = capsys.readouterr().out
    assert f"{out / 'checkpoint-4' / name}" in stdout and "damaged" in stdout
    assert f"resuming from {out / 'checkpoint-2'}" in stdout
    assert (out / ".corrupt" / "checkpoint-4" / name).is_file()  # set aside, not deleted
    # resumed from step 2, trained steps 3-4 again: the same weights as the uninterrupted run
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_no_intact_checkpoint_is_one_line_naming_the_file(ws, reference, tmp_path, capsys):
    out = resumable_copy(reference, tmp_path / "run", keep=("checkpoint-4",))
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    capsys.readouterr()
    assert train_main(flags(ws, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(out / "checkpoint-4" / "optimizer.pt") in err and "--resume_from_checkpoint" in err

    other = resumable_copy(reference, tmp_path / "explicit", keep=())
    bad = out / "checkpoint-4"  # refused before anything was loaded or moved
    assert train_main(flags(ws, other, "--resume_from_checkpoint", str(bad))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad / "optimizer.pt") in err, err
