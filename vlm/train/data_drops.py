"""Samples dropped while training: counted, written to `data_report.json`, and the run stopped past `--max_drop_ratio`.

The up-front check (`vlm.data.check`) cannot see everything: under the default `--check_images exists`
a corrupt image is found only when its batch is built, and a file can vanish mid-run. The dataset
replaces such a sample by the next usable one (`SupervisedDataset(on_bad_image="replace")`) and the
batch carries the dropped samples under `DATA_DROPS_KEY`; `VLMTrainer.training_step` takes them off
the batch (the forward never sees them) and hands them to `DataDropsCallback` (`record_drops`).

Design choices:
- Counting happens in the training process, not in the dataset: DataLoader workers are separate
  processes whose counters the trainer never sees; the batch is the one channel that reaches it.
- A sample counts once however often it is met (epochs, workers each meeting it): by its position.
- Under DDP each rank meets different samples: at every optimizer step the ranks sum their new
  drops (one all-reduce of one integer) and, when there are any, gather them; so every rank takes
  the same stop decision at the same step, and only rank 0 writes the report.
- The ratio is the up-front check's: (dropped before training + dropped while training) / all
  samples. Past it, the step ends with a checkpoint (`control.should_save`) and training stops;
  `raise_if_stopped` then raises `DataDropsExceeded` (one line naming the checkpoint and the
  report) instead of saving a final model of a run that did not finish.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from transformers import TrainerCallback

from vlm.data.dataset import DATA_DROPS_KEY
from vlm.data.errors import REASONS
from vlm.errors import UserError


class DataDropsExceeded(UserError):
    """Training stopped because too many samples could not be used; the message is the one line to show."""


class DataDropsCallback(TrainerCallback):
    """Counts the samples replaced at run time, updates the report, stops the run past `max_drop_ratio`.

    Args:
        total: samples in the data (the report's `total`).
        kept: samples kept by the up-front check (the dataset's length).
        max_drop_ratio: `--max_drop_ratio`.
        report_path: `data_report.json`, written by rank 0 (None: not written).
    """

    def __init__(self, *, total: int, kept: int, max_drop_ratio: float, report_path: str | None):
        self.total = total
        self.dropped_before = total - kept
        self.max_drop_ratio = max_drop_ratio
        self.report_path = report_path
        self.dropped: dict[int, dict[str, Any]] = {}  # position -> problem, in the order met
        self._pending: list[dict[str, Any]] = []
        self.stopped_at: int | None = None
        self.checkpoint: str | None = None

    def add(self, drops: list[dict[str, Any]]) -> None:
        """Drops taken off one batch in this process (counted at the step's end)."""
        self._pending.extend(drops)

    @property
    def ratio(self) -> float:
        return (self.dropped_before + len(self.dropped)) / self.total if self.total else 0.0

    def on_step_end(self, args, state, control, **kwargs):
        new = _gather(self._pending, args)
        self._pending = []
        fresh = []
        for drop in new:
            if drop["index"] not in self.dropped:
                self.dropped[drop["index"]] = {**drop, "step": state.global_step}
                fresh.append(drop)
        if fresh and state.is_world_process_zero:
            for drop in fresh:
                print(f"data: step {state.global_step}: sample {drop['id']!r} (index {drop['index']}) replaced: "
                      f"{drop['reason']}: {drop['detail']}", flush=True)
            self._write_report()
        if fresh and self.ratio > self.max_drop_ratio and self.stopped_at is None:
            self.stopped_at = state.global_step
            self.checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            control.should_save = True
            control.should_training_stop = True
        return control

    def _write_report(self) -> None:
        """`data_report.json` updated in place: run-time drops added to `dropped`/`problems`, `kept` lowered."""
        if self.report_path is None:
            return
        try:
            with open(self.report_path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = {"total": self.total, "kept": self.total - self.dropped_before, "dropped": {}, "problems": []}
        problems = [p for p in report.get("problems", []) if not p.get("in_training")]  # the up-front check's
        run_time = [{**p, "in_training": True} for p in self.dropped.values()]
        counts = Counter(p["reason"] for p in problems + run_time)
        report["kept"] = report["total"] - len(problems) - len(run_time)
        report["dropped"] = {reason: counts[reason] for reason in REASONS if counts[reason]}
        report["problems"] = problems + run_time
        report.setdefault("notes", {})["dropped_in_training"] = len(run_time)
        tmp = f"{self.report_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        os.replace(tmp, self.report_path)

    def raise_if_stopped(self) -> None:
        """After `trainer.train()`: DataDropsExceeded (the one line) when this callback stopped the run."""
        if self.stopped_at is None:
            return
        reasons = ", ".join(f"{r}={n}" for r, n in Counter(p["reason"] for p in self.dropped.values()).items())
        first = next(iter(self.dropped.values()))
        raise DataDropsExceeded(
            f"stopped at step {self.stopped_at}: {len(self.dropped)} sample(s) could not be used while training "
            f"({reasons}; first: {first['id']!r} {first['detail']}), {self.dropped_before + len(self.dropped)} of "
            f"{self.total} dropped in all ({self.ratio:.1%}), more than --max_drop_ratio {self.max_drop_ratio}; "
            f"checkpoint {self.checkpoint}; report {self.report_path}. Fix or remove those images (`vlm data check "
            "--check_images full`) and rerun the same command to resume, or raise --max_drop_ratio")


def record_drops(trainer, inputs: dict[str, Any]) -> None:
    """Take the dropped samples off a batch (before the forward) and count them on the trainer's DataDropsCallback."""
    drops = inputs.pop(DATA_DROPS_KEY, None)
    if not drops:
        return
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, DataDropsCallback):
            callback.add(drops)
            return
    raise AssertionError("a batch reports dropped samples but the trainer has no DataDropsCallback to count them")


def data_drops_callbacks(dataset, max_drop_ratio: float, report_path: str | None) -> list[DataDropsCallback]:
    """[the callback] for a training `SupervisedDataset` that replaces unusable samples (its `records` are every
    sample, its length the kept ones); [] for none or one that raises."""
    if dataset is None or getattr(dataset, "on_bad_image", "raise") != "replace":
        return []
    return [DataDropsCallback(total=len(dataset.records), kept=len(dataset), max_drop_ratio=max_drop_ratio,
                              report_path=report_path)]


def raise_if_stopped(trainer) -> None:
    """After `trainer.train()`: `DataDropsExceeded` when its DataDropsCallback stopped the run."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, DataDropsCallback):
            callback.raise_if_stopped()


def _gather(local: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    """Every rank's new drops (this process's alone when not distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local)
    count = torch.tensor([len(local)], device=args.device)
    dist.all_reduce(count)
    if int(count.item()) == 0:
        return []
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(local))
    return [drop for part in parts for drop in part]
