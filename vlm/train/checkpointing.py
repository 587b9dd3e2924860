"""Atomic checkpoint folders: a checkpoint is either complete under its final name or not there at all.

`staged_folder(final)` hands out a staging folder, `<parent>/.incomplete/<name>`, for every process of the run
to write into; when the block ends normally the writing process flushes every file to disk (fsync), renames
the folder to `final` (one `os.replace`, atomic on a POSIX file system) and flushes the parent folder, so the
rename itself survives a crash. A process killed, or an exception raised, before that leaves at most a
staging folder, which nothing lists (`vlm.train.run_folder.list_checkpoints` sees only `checkpoint-N` in the
output folder) and the next save at that name clears.

Design choices:
- The staging folder is beside the final one (same file system), so the rename never becomes a copy.
- Under `torch.distributed`, every rank writes its own files (RNG state, optimizer shards) into the one
  staging folder: a barrier after the writer clears stale files, and one after everyone has written and
  before the rename; a last one after the rename, so no rank goes on before the checkpoint exists.
- A damaged final checkpoint (bits rotted after the rename, a file system without an atomic rename) is not
  this module's business: `run_folder.find_resume_checkpoint` sets it aside and resumes from an older one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STAGING_DIR = ".incomplete"


def _no_barrier() -> None:
    return None


def default_barrier() -> Callable[[], None]:
    """`torch.distributed.barrier` when a process group is running, else a no-op."""
    import torch.distributed as dist

    return dist.barrier if dist.is_available() and dist.is_initialized() else _no_barrier


def fsync_tree(folder: str) -> None:
    """Flush every file and folder under `folder` (itself included) to disk."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(final: str) -> str:
    """Where `final` is written before it is complete: `<parent>/.incomplete/<name>`."""
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, STAGING_DIR, name)


@contextmanager
def staged_folder(final: str, *, is_writer: bool = True,
                  barrier: Callable[[], None] | None = None) -> Iterator[str]:
    """Yield the staging folder for `final`; on a normal exit, publish it as `final` in one rename.

    Args:
        final: the folder the checkpoint must end up as (e.g. `<output_dir>/checkpoint-40`); a folder
            already there is replaced only once the new one is complete.
        is_writer: whether this process clears the staging folder and renames it (one process per
            file system: the Trainer's `args.should_save`); the others only write into it.
        barrier: synchronises the processes of a run (default: `torch.distributed.barrier` when a process
            group is running).

    On an exception in the block the writer removes the staging folder (it may hold a half-written file)
    and `final` is left as it was; a killed process leaves the staging folder, cleared by the next save.
    """
    sync = default_barrier() if barrier is None else barrier
    staging = staging_path(final)
    if is_writer:
        shutil.rmtree(staging, ignore_errors=True)  # a killed attempt's leftovers must not join this one
        os.makedirs(staging)
    sync()
    try:
        yield staging
    except BaseException:
        if is_writer:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    sync()  # every process has written its files
    if is_writer:
        publish(staging, final)
    sync()


def publish(staging: str, final: str) -> None:
    """Flush `staging` to disk and rename it to `final` (replacing an older `final` only after that)."""
    fsync_tree(staging)
    parent = os.path.dirname(os.path.abspath(final))
    replaced = None
    if os.path.isdir(final):  # moved aside, not deleted in place: a kill never leaves a half-deleted `final`
        replaced = staging_path(final) + ".replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    fsync_dir(parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
