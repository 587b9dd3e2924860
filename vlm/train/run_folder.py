"""The output folder of a training run: whose run it holds, who is writing it, and what can be resumed.

A rerun of the same command continues the run in `--output_dir`; these checks make sure it is the same run:
- the run record (`vlm_run.json`, written at the start) holds the run's *defining* flags, those that change
  what is trained (model, data, template, learning rates, seed, batch, steps/epochs, schedule, optimizer,
  LoRA/QLoRA). A folder recording other values is refused naming the flags that differ, with
  `--overwrite_output_dir` to start over (a folder where no checkpoint or model was saved yet is simply reused). Logging, saving cadence, workers, reporting and the output folder
  itself are not defining: changing them continues the run.
- a lock file (`.lock`, the writer's pid) keeps a second process out while the first runs; a lock whose pid
  is gone (the run was killed) is taken over with a notice.
- a checkpoint is used only when every file in it reads back (safetensors headers cover their files, JSON
  parses, torch's zip archives pass their CRC check): a damaged newest checkpoint is set aside into
  `.corrupt/` with a notice naming the bad file and the next older one is used.
- a run whose newest checkpoint is at its last step is finished: a rerun only writes its final model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile

from vlm.errors import FolderError

RUN_RECORD = "vlm_run.json"
LOCK_FILE = ".lock"
CORRUPT_DIR = ".corrupt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# The flags that define a run (names as on the command line, without --). Everything else may change
# between a run and its resume.
DEFINING_FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("model_name_or_path", "vision_tower", "mm_projector_type", "mm_vision_select_layer",
              "mm_vision_select_feature", "pretrain_mm_mlp_adapter", "tune_mm_mlp_adapter", "unfreeze_vision_tower",
              "freeze_backbone", "model_weights"),
    "data": ("data_path", "image_folder", "data_format", "image_map", "captions_file", "version",
             "image_aspect_ratio", "truncate", "allow_absolute_image_paths"),
    "training": ("learning_rate", "mm_projector_lr", "mm_vision_tower_lr", "seed", "data_seed",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "max_steps",
                 "num_train_epochs", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "adam_beta1",
                 "adam_beta2", "adam_epsilon", "max_grad_norm", "model_max_length", "group_by_modality_length",
                 "train_sampling_strategy", "freeze_mm_mlp_adapter", "bf16", "fp16", "lora_enable", "lora_r",
                 "lora_alpha", "lora_dropout", "lora_bias", "target_modules", "lora_weight_path", "bits",
                 "quant_type", "double_quant"),
}
# Preference training's defining flags, recorded only for `--method dpo` (a supervised run's record is unchanged).
PREFERENCE_FLAGS = ("method", "beta", "loss_type", "label_smoothing", "rpo_alpha", "precompute_ref_log_probs")
_PATH_FLAGS = ("model_name_or_path", "vision_tower", "pretrain_mm_mlp_adapter", "model_weights", "data_path",
               "image_folder", "image_map", "captions_file", "lora_weight_path")


class RunFolderError(FolderError):
    """The output folder cannot be used as asked; the message is the one line to show."""


def _value(name: str, value):
    if name in _PATH_FLAGS and isinstance(value, str) and value:
        # the same folder named from another working directory is the same run; hub ids stay as they are
        return ",".join(os.path.abspath(p) if os.path.exists(p) else p for p in value.split(","))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # enums (lr_scheduler_type, optim)


def run_record(model_args, data_args, training_args) -> dict:
    """The defining flags of a run; `model_args` may be None (the demo records its model itself)."""
    record = {}
    for group, args in (("model", model_args), ("data", data_args), ("training", training_args)):
        if args is None:
            continue
        for name in DEFINING_FLAGS[group]:
            if hasattr(args, name):
                record[name] = _value(name, getattr(args, name))
    if getattr(training_args, "method", "sft") != "sft":
        record.update({name: _value(name, getattr(training_args, name)) for name in PREFERENCE_FLAGS})
    return record


def list_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def check_run_record(output_dir: str, record: dict, *, overwrite: bool, resume_given: bool = False) -> None:
    """Refuse an output folder that holds another run. Read-only: every process of a run may call it."""
    path = os.path.join(output_dir, RUN_RECORD)
    if overwrite or not os.path.isdir(output_dir):
        return
    if not os.path.isfile(path):
        checkpoints = list_checkpoints(output_dir)
        if checkpoints and not resume_given:
            raise RunFolderError(
                f"--output_dir {output_dir} holds checkpoints ({os.path.basename(checkpoints[0])}) but no run record "
                f"({RUN_RECORD}), so they may be another run's: pass --overwrite_output_dir to start over, "
                "--resume_from_checkpoint to continue from one, or another --output_dir")
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"run record {path} is unreadable ({exc}): pass --overwrite_output_dir to start over, "
                             "or another --output_dir") from None
    differ = [k for k in sorted(set(saved) | set(record)) if saved.get(k) != record.get(k)]
    # a run that stopped before saving anything (a data error, say) holds nothing to protect: started afresh
    saved_work = list_checkpoints(output_dir) or any(
        os.path.isfile(os.path.join(output_dir, name)) for name in ("config.json", "adapter_config.json"))
    if differ and saved_work:
        shown = ", ".join(f"--{k} {saved.get(k)!r} (now {record.get(k)!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise RunFolderError(
            f"--output_dir {output_dir} holds another run: it was started with {shown}{more}; pass the same flags "
            "to resume it, --overwrite_output_dir to start over there, or another --output_dir")


def start_run_folder(output_dir: str, record: dict, *, overwrite: bool) -> None:
    """Process 0, lock held: with `overwrite`, remove the previous run's checkpoints and outputs; write the record."""
    os.makedirs(output_dir, exist_ok=True)
    if overwrite:
        from vlm.train.callbacks import LOSS_PLOT, METRICS_FILE

        removed = list_checkpoints(output_dir)
        for folder in removed + [os.path.join(output_dir, n) for n in (".incomplete", CORRUPT_DIR)]:
            shutil.rmtree(folder, ignore_errors=True)
        for name in (METRICS_FILE, LOSS_PLOT, RUN_RECORD):
            if os.path.isfile(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        if removed:
            print(f"--overwrite_output_dir: removed {len(removed)} checkpoint(s) of the previous run in {output_dir}",
                  flush=True)
    tmp = os.path.join(output_dir, RUN_RECORD + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(output_dir, RUN_RECORD))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class FolderLock:
    """`<output_dir>/.lock` holding this process's pid while the run writes the folder (process 0 only)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.held = False

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self.check()
                print(f"note: taking over the lock {self.path} left by pid {pid}, which is no longer running",
                      flush=True)
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return
        raise RunFolderError(f"could not take the lock {self.path}: another run is starting there; retry")

    def check(self) -> int | None:
        """Raise when a live process other than this one holds the lock; else the stale holder's pid (or None)."""
        pid = self._owner()
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            raise RunFolderError(
                f"--output_dir {os.path.dirname(self.path)} is in use by another run (pid {pid}, lock file "
                f"{self.path}): wait for it to end, or use another --output_dir")
        return pid

    def _owner(self) -> int | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self.held and self._owner() == os.getpid():
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- checkpoints --------------------------------------------------------------------------------------

_checked: dict[tuple, str | None] = {}  # a checkpoint is read through once per process, not once per look


def checkpoint_problem(folder: str) -> str | None:
    """None when every file of the checkpoint reads back, else '<file>: <reason>'. Reads every byte of the
    torch files (their CRCs), so a result is kept for the same files (names, sizes, mtimes)."""
    names = set(os.listdir(folder))
    key = (os.path.abspath(folder), *sorted((n, s.st_size, s.st_mtime_ns) for n in names
                                            if (s := os.stat(os.path.join(folder, n)))))
    if key not in _checked:
        _checked[key] = _checkpoint_problem(folder, names)
    return _checked[key]


def _checkpoint_problem(folder: str, names: set[str]) -> str | None:
    from safetensors import safe_open

    if "trainer_state.json" not in names:
        return f"{os.path.join(folder, 'trainer_state.json')}: missing"
    weights = {"model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"}
    if not names & weights:
        return f"{folder}: no model.safetensors or adapter_model.safetensors"
    for name in sorted(names):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, "pt") as f:  # the header must describe a file covered to its end
                    f.keys()
            elif name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            elif name.endswith((".pt", ".pth", ".bin")):
                with zipfile.ZipFile(path) as archive:  # torch.save's format; CRCs catch damaged data
                    bad = archive.testzip()
                if bad is not None:
                    return f"{path}: damaged entry {bad}"
        except Exception as exc:  # noqa: BLE001 -- any failure to read back makes the checkpoint unusable
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"{path}: {reason}"
    return None


def find_resume_checkpoint(output_dir: str, *, set_aside: bool = False) -> str | None:
    """The newest intact checkpoint in `output_dir` (staged, unfinished ones are never listed).

    A damaged newer one is named in a notice; with `set_aside` (process 0 of a run) it is moved into
    `.corrupt/` so that `save_total_limit` never keeps it in place of a good one. Raises `RunFolderError`
    naming the bad file when no checkpoint is intact.
    """
    bad: list[str] = []
    for folder in list_checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            if bad:
                print(f"note: resuming from the older {folder}", flush=True)
            return folder
        bad.append(problem)
        where = ""
        if set_aside:
            aside = os.path.join(output_dir, CORRUPT_DIR, os.path.basename(folder))
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            where = f"; moved to {aside}"
        print(f"note: checkpoint {folder} is damaged ({problem}){where}", flush=True)
    if bad:
        raise RunFolderError(f"no intact checkpoint to resume in {output_dir}: {bad[0]}; pass "
                             "--resume_from_checkpoint with an intact one, or --overwrite_output_dir to start over")
    return None


def check_something_to_resume(output_dir: str, resume: str | None, *, overwrite: bool) -> None:
    """Early and read-only (before a model is loaded): the explicit checkpoint reads back, or, when the folder
    has checkpoints, one of them does. `find_resume_checkpoint` later picks it and says so."""
    if resume is not None:
        check_checkpoint(resume)
        return
    first_problem = None
    for folder in [] if overwrite else list_checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return
        first_problem = first_problem or problem
    if first_problem is not None:
        raise RunFolderError(f"no intact checkpoint to resume in {output_dir}: {first_problem}; pass "
                             "--resume_from_checkpoint with an intact one, or --overwrite_output_dir to start over")


def check_checkpoint(folder: str) -> None:
    """An explicit `--resume_from_checkpoint`: one line naming the bad file when it does not read back."""
    if not os.path.isdir(folder):
        raise RunFolderError(f"--resume_from_checkpoint {folder}: no such folder")
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise RunFolderError(f"--resume_from_checkpoint {folder} is damaged: {problem}; pass an intact checkpoint")


def checkpoint_step(checkpoint: str | None) -> int:
    """N of `.../checkpoint-N`; 0 for None."""
    return 0 if checkpoint is None else int(os.path.basename(checkpoint.rstrip(os.sep)).rsplit("-", 1)[1])


def finished_step(checkpoint: str) -> int | None:
    """The checkpoint's step when the run it belongs to had reached its last step there, else None."""
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    step, last = state.get("global_step"), state.get("max_steps")
    return step if isinstance(step, int) and isinstance(last, int) and 0 < last <= step else None


def report_interrupted(output_dir: str) -> int:
    """Ctrl-C: print one line on stderr, the checkpoint a rerun of the same command resumes from (`fit` finds
    the newest complete one in the output folder) or that there is none yet; returns the exit code, 130."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # an open bar would be redrawn at exit, after our line
        bar.close()
    # the newest complete one (renamed into place when fully written); the rerun also checks it reads back
    resume = next(iter(list_checkpoints(output_dir)), None)
    if resume is None:
        line = (f"interrupted before the first checkpoint in {output_dir} (--save_steps sets how often); "
                "rerun the same command to start again")
    else:
        line = f"interrupted; rerun the same command to resume from {resume}"
    print(line, file=sys.stderr, flush=True)
    return 130
