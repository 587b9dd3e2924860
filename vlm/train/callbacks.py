"""Run outputs a user watches: a tqdm bar with loss, learning rate and tokens/s; `metrics.jsonl`; `loss.png`."""

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
    """Appends one JSON object per logged step to `<output_dir>/metrics.jsonl`; plots `loss.png` at the end."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                  **{k: v for k, v in logs.items() if k not in ("loss", "learning_rate")}}
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(os.path.join(args.output_dir, METRICS_FILE), os.path.join(args.output_dir, LOSS_PLOT))


def plot_loss(metrics_path: str, out_path: str) -> bool:
    """Training-loss curve from metrics.jsonl; False when there is nothing to plot."""
    if not os.path.isfile(metrics_path):
        return False
    steps, losses = [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            steps.append(record["step"])
            losses.append(record["loss"])
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return True
