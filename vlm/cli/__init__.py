"""The `vlm` console command (layer 4): one subcommand per job, each implemented by `main(argv)` in its own module;
every command (and train.py, test.py) runs under `run`, the error policy of `vlm.errors`.

Subcommand modules are imported only when used, so `vlm --help` stays fast and a missing optional
dependency of one subcommand never breaks another.
"""

from __future__ import annotations

import errno
import importlib
import sys
from typing import Callable

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "ask": ("vlm.cli.ask", "answer one question about an image (the test.py command)"),
    "data": ("vlm.cli.data", "check, convert, filter or synthesise datasets"),
    "demo": ("vlm.demo", "train the tiny demo VLM on the synthetic shapes set and evaluate it"),
    "train": ("vlm.cli.train", "train a VLM (same flags as train.py)"),
    "chat": ("vlm.cli.chat", "multi-turn chat about an image in the terminal"),
    "generate": ("vlm.cli.generate", "answer a JSONL file of image questions in batches"),
    "merge-lora": ("vlm.cli.merge_lora", "merge a LoRA run into its base model"),
    "export": ("vlm.cli.export", "export a model folder to another format (llava-hf)"),
    "eval": ("vlm.cli.eval", "score a model: VQA accuracy, ChartQA relaxed accuracy, choice, exact match, captions"),
    "serve": ("vlm.cli.serve", "OpenAI-compatible chat API and chat page for a model"),
}


def _usage() -> str:
    lines = ["usage: vlm <command> [args...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as safetensors reports it when saving (a SafetensorError "... (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(exc).__name__ == "SafetensorError" and f"(os error {errno.ENOSPC})" in str(exc)


def output_flag(argv: list[str]) -> str:
    """' under --output_dir X' (or --output) from the command's flags: where the writes went when the error
    names no file (safetensors' does not)."""
    for i, arg in enumerate(argv):
        for flag in ("--output_dir", "--output"):
            if arg == flag and i + 1 < len(argv):
                return f" under {flag} {argv[i + 1]!r}"
            if arg.startswith(flag + "="):
                return f" under {flag} {arg.split('=', 1)[1]!r}"
    return ""


def disk_full_reason(exc: BaseException, argv: list[str]) -> str | None:
    """'no space left on device writing F' (or 'under --output_dir X') when `exc` is a full disk, else None."""
    if not is_disk_full(exc):
        return None
    where = f" writing {exc.filename!r}" if getattr(exc, "filename", None) else output_flag(argv)
    return f"no space left on device{where}"


_RUNNING: str | None = None  # the name of the command being run, while `run` runs it


def run(prog: str, main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run one command's `main(argv)` under the error policy of `vlm.errors`: a `UserError` (or a full disk) is
    one line `prog: error: ...` and exit 2; Ctrl-C one line and 130; anything else propagates (traceback, exit 1)."""
    from vlm.errors import UserError

    global _RUNNING
    argv = list(sys.argv[1:] if argv is None else argv)
    outer, prog = _RUNNING, _RUNNING or prog  # `vlm train` runs train.py's main, itself under run: one name
    _RUNNING = prog
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (train and demo say where to resume)
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        reason = disk_full_reason(exc, argv)
        if reason is None:
            raise
        print(f"{prog}: error: {reason}; free space (or write elsewhere) and run the command again",
              file=sys.stderr, flush=True)
        return 2
    finally:
        _RUNNING = outer


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"vlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "demo" and "--preference" in rest:  # the demo, then DPO from it (vlm.demo_preference builds on vlm.demo)
        module = importlib.import_module("vlm.demo_preference")
        return run("vlm demo --preference", module.main, [a for a in rest if a != "--preference"])
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return run(f"vlm {name}", module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
