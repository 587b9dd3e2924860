"""The embedded demo, short: a tiny VLM trained from scratch on synthetic shapes reads the pictures.

The full demo (`python train.py`, ~10 minutes) is measured in the Training issue's note; this variant
trains for about a minute and asserts that held-out accuracy is far above the blind baseline (the same
model with the images shuffled across samples), plus the demo's output contract (DESIGN.md).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types

import pytest

import vlm
from vlm.demo import DemoConfig, run_demo

SHORT_STEPS = 1500  # ~60 s on 2 cores; the full demo runs 8000
MARGIN = 0.15  # measured: held-out ~0.6-0.7 against a blind ~0.35 at this length


def test_short_demo_learns_from_images(tmp_path, capsys):
    config = DemoConfig(run_dir=str(tmp_path / "demo"), n_train=12000, n_eval=100, max_steps=SHORT_STEPS)
    result = run_demo(config)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"accuracy={result['accuracy']:.4f} blind_accuracy={result['blind_accuracy']:.4f}"
    assert result["n"] >= 190
    assert set(result["per_question_type"]) == {"color", "shape", "count", "exists"}
    assert result["accuracy"] >= result["blind_accuracy"] + MARGIN, result

    run = tmp_path / "demo"
    saved = json.loads((run / "eval.json").read_text())
    assert {"accuracy", "blind_accuracy", "n", "per_question_type"} <= saved.keys()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "lr"} <= s.keys() for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] / 3
    assert (run / "loss.png").stat().st_size > 1000
    model = vlm.from_pretrained(run / "model")  # the model folder reloads
    assert model.vlm_config.num_image_tokens == 9


# --- threads, location, interruption and resume (fast: tiny configs) -----------------------------------

TINY = ["--n_train", "64", "--n_eval", "8", "--batch_size", "4", "--save_steps", "10"]


class _Stop(Exception):
    """Raised by a patched `fit` once it has seen what the test wants."""


def _record_threads_in_fit(monkeypatch) -> list[int]:
    import torch

    import vlm.train.run

    seen = []

    def fit(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise _Stop

    monkeypatch.setattr(vlm.train.run, "fit", fit)  # the demo trains through vlm.train.run.run
    return seen


@pytest.mark.parametrize("threads", [1, 2])
def test_demo_threads_flag_reaches_torch_and_is_restored(tmp_path, monkeypatch, threads):
    import torch

    from vlm.demo import main

    seen = _record_threads_in_fit(monkeypatch)
    torch.set_num_threads(3)
    with pytest.raises(_Stop):
        main(["--output_dir", str(tmp_path), *TINY, "--threads", str(threads)])
    assert seen == [threads]
    assert torch.get_num_threads() == 3  # the caller's setting comes back


def test_train_py_without_arguments_runs_the_demo_with_the_default_threads(tmp_path, monkeypatch):
    import vlm.demo
    import vlm.cli.train

    configs = []
    monkeypatch.setattr(vlm.demo, "run_demo", configs.append)
    monkeypatch.setenv("VLM_DEMO_DIR", str(tmp_path / "elsewhere"))
    assert vlm.cli.train.main([]) == 0
    assert vlm.cli.train.main(["--demo", "--threads", "2", "--max_steps", "7"]) == 0
    assert [(c.threads, c.max_steps) for c in configs] == [(vlm.demo.DEFAULT_THREADS, 8000), (2, 7)]
    assert vlm.demo.DEFAULT_THREADS == 1  # bench/RESULTS.md: 2 threads collapse on a busy machine
    assert vlm.demo.demo_dir(configs[0].run_dir) == str(tmp_path / "elsewhere")


def test_demo_dir_argument_environment_default(tmp_path, monkeypatch):
    from vlm.demo import demo_dir, demo_model_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLM_DEMO_DIR", raising=False)
    assert demo_dir() == str(tmp_path / "runs" / "demo")
    monkeypatch.setenv("VLM_DEMO_DIR", "from_env")
    assert demo_dir() == str(tmp_path / "from_env")  # read when called, made absolute
    assert demo_dir(tmp_path / "given") == str(tmp_path / "given")
    assert demo_model_dir("given") == str(tmp_path / "given" / "model")


def test_ctrl_c_during_data_generation_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import vlm.data.synth
    from vlm.demo import main

    real, calls = vlm.data.synth.render_scene, []

    def render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vlm.data.synth, "render_scene", render)
    assert main(["--output_dir", str(tmp_path), *TINY]) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"interrupted before the first checkpoint in {tmp_path} (--save_steps sets how often); " \
                        "rerun the same command to start again"
    assert "Traceback" not in err
    assert "images (train)" in err  # the generation's progress bar
    assert not (tmp_path / "data" / "complete.json").exists()  # an interrupted set is never reused


def test_ctrl_c_in_train_py_and_vlm_command(tmp_path, monkeypatch, capsys):
    import vlm.cli.eval
    import vlm.cli.train
    import vlm.train.config
    from vlm.cli import main as vlm_main

    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    config = types.SimpleNamespace(training=types.SimpleNamespace(output_dir=str(tmp_path)), main_process=True)
    monkeypatch.setattr(vlm.train.config.RunConfig, "from_flags", lambda argv: config)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(vlm.cli.train, "train", interrupted)
    assert vlm.cli.train.main(["--output_dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"interrupted; rerun the same command to resume from {tmp_path / 'checkpoint-5'}"

    monkeypatch.setattr(vlm.cli.eval, "main", interrupted)
    assert vlm_main(["eval"]) == 130
    assert capsys.readouterr().err.strip() == "vlm eval: interrupted"


def test_demo_interrupted_by_sigint_resumes_to_the_same_end_without_regenerating(tmp_path, monkeypatch, capsys):
    """A real Ctrl-C (SIGINT) after the first checkpoint: exit 130 and one line; the rerun reuses the data,
    resumes from the checkpoint that line names and stops at the same step."""
    import vlm.data.check
    import vlm.data.synth
    from vlm.demo import DemoConfig, run_demo

    run = tmp_path / "demo"
    steps = 200
    proc = subprocess.Popen([sys.executable, "-m", "vlm", "demo", "--output_dir", str(run), *TINY,
                             "--max_steps", str(steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(run.glob("checkpoint-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "images (train)" in err and "train:" in err  # progress of the generation and of training
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted; rerun the same command to resume from "), last
    checkpoint = last.rsplit(" ", 1)[1]
    done = int(checkpoint.rsplit("-", 1)[1])
    assert 10 <= done < steps
    assert f"demo: run folder {run} " in out

    rendered = []
    real = vlm.data.synth.render_scene
    monkeypatch.setattr(vlm.data.synth, "render_scene", lambda *a, **k: rendered.append(1) or real(*a, **k))
    monkeypatch.setattr(vlm.data.check, "_PROGRESS_FROM", 0)
    result = run_demo(DemoConfig(run_dir=str(run), n_train=64, n_eval=8, batch_size=4, save_steps=10,
                                 max_steps=steps))
    captured = capsys.readouterr()
    assert rendered == [] and result["data_reused"]  # the complete set was kept, not drawn again
    assert "demo: reusing the complete generated set" in captured.out
    assert "data: validation reused from " in captured.out  # the resume skips the check (issue 12 point 7)
    assert "data check" not in captured.err  # no check progress bar: the cached result was read
    assert result["resumed_from"] == checkpoint
    assert result["train_steps"] == steps - done
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(20, steps + 1, 20))  # one curve: no step logged twice, none missing
    assert f"model in {run / 'model'}" in captured.out

    again = run_demo(DemoConfig(run_dir=str(run), n_train=64, n_eval=8, batch_size=4, save_steps=10,
                                max_steps=steps))  # a finished run: evaluated again, not trained further
    assert again["train_steps"] == 0 and again["resumed_from"] == str(run / f"checkpoint-{steps}")
    assert not (run / f"checkpoint-{steps + 1}").exists()
    assert (again["accuracy"], again["blind_accuracy"]) == (result["accuracy"], result["blind_accuracy"])
    assert "training already finished" in capsys.readouterr().out
