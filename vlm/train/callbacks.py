"""Run outputs a user watches: a tqdm bar with loss, learning rate and tokens/s; `metrics.jsonl`; `loss.png`.

`metrics.jsonl` is appended to as the run logs, so a disk that fills mid-append can leave a torn last line:
readers here skip unreadable lines and count them, and a run (or the demo) starting in the folder rewrites
the file with the readable records up to the step it resumes from (`truncate_metrics`), so a resumed run
never repeats steps. The loss plot is drawn after the final model is saved (`vlm.train.run.fit`).
"""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm
from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class ProgressBarCallback(TrainerCallback):
    """Replaces transformers' ProgressCallback: the latest loss, lr and tokens/s live in the bar's postfix."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
            if "tokens_per_s" in logs:
                postfix["tok/s"] = f"{logs['tokens_per_s']:.0f}"
            self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsCallback(TrainerCallback):
    """Appends one JSON object per logged step to `<output_dir>/metrics.jsonl`: training rows (`step`, `loss`, `lr`,
    ...) and evaluation rows (`step`, `eval_loss`, `eval_<metric>`, `eval_runtime`, ...; vlm.train.evaluation)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            record = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                      **{k: v for k, v in logs.items() if k not in ("loss", "learning_rate")}}
        elif "eval_loss" in logs:
            record = {"step": state.global_step, **logs}
        else:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> tuple[list[dict], int]:
    """The readable records of a metrics.jsonl (objects with an int `step`) and how many lines were not."""
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                bad += 1
    return records, bad


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep the readable records of steps up to `last_step` (the checkpoint a run resumes from; 0: a fresh
    run keeps none), rewriting the file atomically; returns the number of unreadable lines dropped, which
    is also said in a notice."""
    if not os.path.exists(path):
        return 0
    records, bad = read_metrics(path)
    kept = [r for r in records if r["step"] <= last_step]
    if bad:
        print(f"note: {path}: skipped {bad} unreadable line(s) (a torn write?)", flush=True)
    if len(kept) == len(records) and not bad:
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return bad


def plot_loss(metrics_path: str, out_path: str) -> bool:
    """Training-loss curve from metrics.jsonl, with the eval loss as a second series when the run evaluated
    (unreadable lines skipped, counted in a notice); False when there is nothing to plot."""
    if not os.path.isfile(metrics_path):
        return False
    records, bad = read_metrics(metrics_path)
    if bad:
        print(f"note: {metrics_path}: skipped {bad} unreadable line(s) in the loss plot", flush=True)
    fig = loss_figure(records)
    if fig is None:
        return False
    fig.savefig(out_path, dpi=100)
    return True


def loss_figure(records: list[dict]):
    """The loss plot's `matplotlib.figure.Figure` of metrics.jsonl records: the training loss, and the eval loss
    (rows with `eval_loss`) as a second, labelled series; None without training-loss rows."""
    points = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    if not points:
        return None
    steps, losses = zip(*points)
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    # the object API draws without pyplot's global backend (no matplotlib.use, nothing left open)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(steps, losses, label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if evals else "training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
