"""Readers: one module per source format, each turning raw records into canonical samples.

    read_source("llava_v1_5_mix665k.json")                       # format detected
    read_source("captions.json", format="ai_challenger", caption_mode="sample", seed=1)
    read_source("rlaif_v/train.parquet")                         # tables: vlm.data.formats.table

Preference readers (`trl_preference`, `llava_preference`, `rlaif_v`) give preference samples
(`vlm.data.formats.preference`); the others supervised ones.

Every reader module has `NAME`, `detect(src, **options) -> bool` and
`read(src, **options) -> Iterator[sample | SampleError]` (one item per raw record, or several for
caption files with several captions per image). Detection looks at the file's container (JSON
array / object / lines, CSV) and its first readable records (up to 20): each reader votes on each
record and the format that matches the most records wins, so a broken or misspelt first record does
not decide for the whole file (that record is then reported by the reader). It never guesses: when
no format matches any record, or several tie, `ValueError` names the file, the formats tried and
what it saw, and `format=` (`--data_format`) chooses explicitly. `detection_summary` says in words
what was seen (it goes into the validation report's notes). Reader options (`prompt`, `caption_mode`, ...) are checked against the chosen
reader's signature, so a misspelt or misplaced option is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Iterator

from vlm.data.errors import DataError, SampleError
from vlm.data.formats import (ai_challenger, basic_vlm, coco, llava, llava_preference, qa_table, rlaif_v,
                              trl_preference, xtuner)
from vlm.data.formats.source import _DETECT_RECORDS, SourceFile, open_source

READERS = {m.NAME: m for m in (llava, xtuner, coco, ai_challenger, qa_table, basic_vlm, trl_preference,
                               llava_preference, rlaif_v)}
FORMATS: tuple[str, ...] = tuple(READERS)
PREFERENCE_FORMATS = (trl_preference.NAME, llava_preference.NAME, rlaif_v.NAME)  # their samples are pairs


def format_votes(src: SourceFile, **options: Any) -> dict[str, int]:
    """How many of the file's first readable records (`src.sample`) each format's `detect` accepts."""
    votes = dict.fromkeys(READERS, 0)
    for record in src.sample:
        view = dataclasses.replace(src, first=record)  # readers' detect look at `first`
        for name, reader in READERS.items():
            votes[name] += bool(reader.detect(view, **options))
    return {name: n for name, n in votes.items() if n}


def detection_summary(src: SourceFile, votes: dict[str, int]) -> str:
    """In words: what detection looked at and what each format matched."""
    looked = f"{len(src.sample)} readable record(s) of its first {_DETECT_RECORDS}" if src.kind != "object" else "its object"
    matched = ", ".join(f"{name} {n}" for name, n in sorted(votes.items(), key=lambda kv: -kv[1])) or "none"
    return f"{src.kind} file; looked at {looked}; records matching each format: {matched}"


def detect_format(src: SourceFile | str | Path, **options: Any) -> str:
    """The format that matches the most of the file's first records; ValueError when none does or several tie."""
    if not isinstance(src, SourceFile):
        src = open_source(src)
    votes = format_votes(src, **options)
    best = max(votes.values(), default=0)
    matches = [name for name, n in votes.items() if n == best and n]
    if len(matches) == 1:
        return matches[0]
    first = src.first if src.kind != "object" else {k: "..." for k in list(src.first)[:8]}
    found = "no format matches" if not matches else f"several formats match ({', '.join(matches)})"
    keys = sorted({k for r in src.sample if isinstance(r, dict) for k in r})[:12] if src.kind != "object" else []
    seen = f"; keys seen: {keys}" if keys else ""
    raise DataError(
        f"cannot detect the format of {str(src.path)!r}: {found}; tried {', '.join(FORMATS)} on its "
        f"{detection_summary(src, votes)}{seen} (first record: {first!r:.200}). "
        f"Pass format= / --data_format with one of {FORMATS}"
    )


def reader_options(format: str) -> tuple[str, ...]:
    """The options reader `format` accepts."""
    params = inspect.signature(READERS[format].read).parameters
    return tuple(name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def read_source(path: str | Path, format: str = "auto", **options: Any) -> Iterator[dict | SampleError]:
    """Canonical samples (or SampleErrors for unreadable records) from one data file.

    Args:
        path: the data file.
        format: "auto" (detect) or one of `FORMATS`.
        **options: reader options (see each reader's `read`); detection sees them too (e.g. `image_map`).

    Raises:
        ValueError: unknown/undetectable format, an option the reader does not take, or a file that
            cannot be parsed at all.
    """
    src = open_source(path)
    return read_opened(src, resolve_format(src, format, options), options)


def resolve_format(src: SourceFile | str | Path, format: str, options: dict[str, Any]) -> str:
    """`format`, or the detected one when "auto"; ValueError for unknown names or options."""
    if format == "auto":
        format = detect_format(src, **options)
    if format not in READERS:
        raise DataError(f"unknown data format {format!r}; expected 'auto' or one of {FORMATS}")
    unknown = sorted(set(options) - set(reader_options(format)))
    if unknown:
        raise DataError(
            f"format {format!r} takes no option(s) {unknown}; its options are {list(reader_options(format))}"
        )
    return format


def read_opened(src: SourceFile, format: str, options: dict[str, Any]) -> Iterator[dict | SampleError]:
    """Read an opened file with a resolved format (see `resolve_format`)."""
    reader = READERS[format]
    try:
        yield from reader.read(src, **options)
    except DataError:
        raise  # already names the file
    except ValueError as e:
        raise DataError(f"{src.path} read as {format!r}: {e}") from e


__all__ = ["FORMATS", "PREFERENCE_FORMATS", "READERS", "detect_format", "detection_summary", "format_votes", "read_opened", "read_source", "reader_options", "resolve_format"]
