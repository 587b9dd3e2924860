"""Why a sample is rejected: one exception type and the closed set of reasons (DESIGN.md, Validation report);
and `DataError`, for data that cannot be used at all."""

from __future__ import annotations

from vlm.errors import UserError

REASONS: tuple[str, ...] = (
    "bad_schema",
    "bad_roles",
    "empty_turn",
    "missing_image",
    "unreadable_image",
    "unsafe_path",
    "placeholder_mismatch",
    "too_long",
    "no_supervised_tokens",
    "template_mismatch",
    "empty_answer",  # a preference pair whose chosen or rejected answer is empty or only whitespace
    "same_answers",  # a preference pair whose chosen and rejected answers are equal (after stripping whitespace)
)


class DataError(UserError):
    """The data as a whole cannot be used (a file that cannot be read, a broken mix file, nothing left to
    train on): a user's mistake, said in one line naming the file and the way out. A ValueError, so callers
    that catch those still do; command lines print it as one line instead of a traceback."""


class SampleError(ValueError):
    """A sample that cannot be used, with a machine-readable `reason` and a human `detail`."""

    def __init__(self, reason: str, detail: str, *, index: int | None = None, sample_id: str | None = None):
        if reason not in REASONS:
            raise AssertionError(f"unknown drop reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.detail = detail
        self.index = index
        self.sample_id = sample_id
        where = ""
        if sample_id is not None or index is not None:
            where = f"sample {sample_id!r} (index {index}): "
        super().__init__(f"{where}{reason}: {detail}")
