"""`python train.py [--config FILE] [--flag value ...]` / `vlm train`: parse the flags, run, exit.

The flags become a `RunConfig` (`RunConfig.from_flags`; `vlm.train.arguments` is the one place that knows them) and
`vlm.train.run.run` does the work. With no arguments (or `--demo [demo flags]`) it runs the embedded demo
(`vlm.demo`). Under `torchrun` every process runs this; `transformers.Trainer` (through accelerate) sets
up the process group from the environment.

Errors follow `vlm.errors` (this runs under `vlm.cli.run`): a user mistake is one line and exit 2, with
three cases said here: too many images unusable mid-run is said by rank 0 only (every rank stops at the
same step), a full disk names how to resume, and Ctrl-C names the checkpoint a rerun resumes from.
"""

from __future__ import annotations

import sys

from vlm.errors import UserError
from vlm.train.run import run as train


class DiskFull(UserError):
    """The disk filled up while the run saved; the message says how to resume."""


def main(argv: list[str] | None = None) -> int:
    """`python train.py [flags]` under the error policy (`vlm.cli.run`): returns 0, 2 after a one-line user
    mistake, 130 after Ctrl-C; a bug propagates. No arguments runs the demo, `--demo [demo flags]` the demo
    with its flags (`vlm demo --help`)."""
    from vlm.cli import run

    return run("train.py", _main, argv)


def _main(argv: list[str]) -> int:
    from vlm.cli import disk_full_reason
    from vlm.train.config import RunConfig
    from vlm.train.data_drops import DataDropsExceeded
    from vlm.train.run_folder import report_interrupted

    if not argv or argv[0] == "--demo":
        from vlm.demo import main as demo_main

        return demo_main(argv[1:])
    config = RunConfig.from_flags(argv)
    try:
        train(config)
    except KeyboardInterrupt:  # Ctrl-C: where to pick up, not a traceback
        return report_interrupted(config.training.output_dir) if config.main_process else 130
    except DataDropsExceeded:  # every rank stops at the same step: rank 0 says it for the run
        if config.main_process:
            raise
        return 2
    except UserError:
        raise
    except Exception as exc:
        reason = disk_full_reason(exc, argv)
        if reason is None:
            raise
        # a save that ran out of space removes its staging folder: the last complete checkpoint stays the newest
        raise DiskFull(f"{reason}; free space and rerun the same command to resume from the last complete "
                       "checkpoint") from None
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under torchrun, wait for every rank to finish (rank 0 may still be saving) and close the process group,
    so no rank exits with collective threads still running (a DeepSpeed CPU rank then aborted at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
