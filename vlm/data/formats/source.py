"""Opening a data file once: its container kind, its first record, and a stream of its raw records.

Design choices:
- A JSON array is streamed element by element (`json.JSONDecoder.raw_decode` over a growing text
  buffer), so a 1 GB LLaVA file is never held as one list of nested dicts; only the caller decides
  what to keep of each record.
- A JSON file whose top level is an object (COCO captions, Basic-VLM maps) is loaded whole: those
  formats join several tables, so a reader needs all of it anyway. It is loaded once here and
  handed to the reader through `SourceFile.data`.
- JSON Lines and CSV are read line by line; an unparsable JSON line becomes a `bad_schema`
  SampleError for that line (reported, not skipped), while a broken JSON array is a `ValueError`
  for the whole file, since nothing after the break can be trusted.
- A `.json` file that holds several top-level objects is read as JSON Lines (found after parsing
  only the first object, so a large JSON Lines file is not loaded to find out).
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vlm.data.errors import SampleError

_CHUNK_CHARS = 1 << 22  # 4 Mi characters read at a time while streaming a JSON array
_SPACE = re.compile(r"[ \t\n\r]*")


@dataclass
class SourceFile:
    """One opened data file.

    Attributes:
        path: the file.
        kind: "array" (JSON list), "object" (JSON object), "lines" (JSON Lines) or "csv".
        first: the first raw record ("array", "lines", "csv"; None when there is none); for
            "object", the whole loaded object.
    """

    path: Path
    kind: str
    first: Any = None
    data: Any = field(default=None, repr=False)

    def records(self) -> Iterator[Any]:
        """Raw records in file order; for JSON Lines, a bad line yields a `SampleError` instead."""
        if self.kind == "array":
            return iter_json_array(self.path)
        if self.kind == "lines":
            return iter_json_lines(self.path)
        if self.kind == "csv":
            return iter_csv(self.path)
        raise AssertionError(f"{self.path}: a JSON object file has no record stream; use .data")


def open_source(path: str | Path) -> SourceFile:
    """Open `path` and find its container kind; ValueError when the file is missing, empty or not JSON/CSV."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} not found (check --data_path)")
    if path.suffix.lower() == ".csv":
        return SourceFile(path, "csv", first=next(iter_csv(path), None))
    if path.suffix.lower() == ".jsonl":
        return SourceFile(path, "lines", first=next(iter_json_lines(path), None))
    start = _first_char(path)
    if start == "[":
        return SourceFile(path, "array", first=next(iter_json_array(path), None))
    if start == "{":
        kind, data = _object_or_lines(path)
        if kind == "lines":
            return SourceFile(path, "lines", first=next(iter_json_lines(path), None))
        return SourceFile(path, "object", first=data, data=data)
    what = "empty" if start == "" else f"starts with {start!r}"
    raise ValueError(f"{path}: {what}; expected a JSON array or object, JSON Lines (.jsonl) or CSV (.csv)")


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8-sig") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


class _JsonStream:
    """A file's text read in chunks, with a cursor; values are decoded in place (no copies of the buffer)."""

    def __init__(self, f, chunk_chars: int):
        self._file, self._chunk = f, chunk_chars
        self._text = codecs.getincrementaldecoder("utf-8-sig")()
        self._decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False

    def more(self) -> bool:
        """Append the next chunk (dropping what lies before the cursor); False at end of file."""
        if self.eof:
            return False
        raw = self._file.read(self._chunk)
        self.eof = not raw
        self.buf = self.buf[self.pos :] + self._text.decode(raw, final=self.eof)
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next non-space character ("" at end of file), cursor moved onto it."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def value(self) -> Any:
        """Decode the JSON value at the cursor, reading on as needed; JSONDecodeError when it is broken."""
        while True:
            try:
                value, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self.more():
                    continue
                raise
            if end == len(self.buf) and self.more():  # a number may continue in the next chunk
                continue
            self.pos = end
            return value


def iter_json_array(path: str | Path, chunk_chars: int = _CHUNK_CHARS) -> Iterator[Any]:
    """Yield the elements of the JSON array in `path` one at a time (constant memory per element)."""
    with open(path, "rb") as f:
        stream = _JsonStream(f, chunk_chars)
        if stream.peek() != "[":
            raise ValueError(f"{path}: not a JSON array")
        stream.pos += 1
        if stream.peek() == "]":
            return
        for count in itertools.count():
            try:
                yield stream.value()
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: broken JSON in element {count} ({e.msg})") from e
            sep = stream.peek()
            if sep == "]":
                return
            if sep != ",":
                raise ValueError(f"{path}: expected ',' or ']' after element {count}, found {sep or 'end of file'!r}")
            stream.pos += 1
            stream.peek()


def _object_or_lines(path: Path) -> tuple[str, Any]:
    """("object", the value) for a file holding one JSON object, ("lines", None) when more values follow it."""
    with open(path, "rb") as f:
        stream = _JsonStream(f, _CHUNK_CHARS)
        stream.peek()
        try:
            value = stream.value()
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return ("lines", None) if stream.peek() else ("object", value)


def iter_json_lines(path: str | Path) -> Iterator[Any]:
    """Yield one parsed value per non-blank line; an unparsable line yields a `bad_schema` SampleError."""
    with open(path, encoding="utf-8-sig") as f:
        index = 0
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield SampleError("bad_schema", f"{Path(path).name} line {lineno}: not JSON ({e.msg})", index=index)
            index += 1


def iter_csv(path: str | Path) -> Iterator[dict[str, str]]:
    """Yield one dict per CSV row, keyed by the header row."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        yield from csv.DictReader(f)
