"""The one error policy of every entry point (`vlm <command>`, `train.py`, `test.py`).

A user mistake (a wrong flag, a missing file, a folder that is not what it should be, unusable data) is a
`UserError`: the command prints one line, `prog: error: <what, why, the way out>`, and exits 2, as argparse
does for a bad flag. Anything else is a bug in vlm or a library: the traceback is printed and the exit code is
1. Library code raises the narrowest of the classes below; they are also `ValueError`s (and
`MissingPathError` a `FileNotFoundError`), so code that catches those keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message names the thing, the reason and the way out."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not readable)."""

    def __init__(self, message: str):
        # FileNotFoundError(message) alone, so str(exc) is the message and not "[Errno None] ..."
        UserError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError):
    """A configuration value (a flag, a config.json field, a run config) that is wrong or inconsistent."""


class FolderError(UserError):
    """A model folder, checkpoint or run folder that is damaged, of the wrong kind, or belongs to another run."""


class MissingDependencyError(UserError, ImportError):
    """An optional package the user's flags need is not installed; the message names the flag and the extra."""
