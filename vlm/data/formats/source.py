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
- One bad record is one counted record: a JSON Lines line that is not UTF-8, is nested deeper
  than Python's parser recurses, holds a number over Python's digit limit, or a string with a lone
  surrogate (`"\\ud800"`, which no UTF-8 writer or tokenizer accepts) is a `bad_schema` SampleError
  naming the file and line; in a JSON array the same element is skipped (its end found by a
  bracket scanner) and reported by its position; a CSV row with a cell over the csv module's field
  limit is reported by its line. A file that is not UTF-8 as a whole (array, object, CSV) is one
  `ValueError` naming the file, the byte and the way out.
- `SourceFile.sample` holds the first few readable records, so format detection can vote over
  more than one record (a broken or misspelt first record does not decide the format).
- Parquet / Arrow files and folders (`datasets` save_to_disk, Parquet shards) are record streams too, read in
  batches with their images left in the file (`vlm.data.formats.table`).
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

from vlm.data.errors import DataError, SampleError
from vlm.data.formats.table import is_pattern, is_table_path, iter_table_records

_CHUNK_CHARS = 1 << 22  # 4 Mi characters read at a time while streaming a JSON array
_SPACE = re.compile(r"[ \t\n\r]*")
_DETECT_RECORDS = 20  # records format detection looks at
# tokens of a JSON value that matter for finding its end: strings (escapes included), brackets, an open string
_SKIP_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|"')
_SCALAR_END = re.compile(r"[,\]}\s]")
_UTF8_HINT = "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)"


@dataclass
class SourceFile:
    """One opened data file.

    Attributes:
        path: the file.
        kind: "array" (JSON list), "object" (JSON object), "lines" (JSON Lines), "csv", or "table" (Parquet,
            Arrow, a `datasets` save_to_disk folder: `vlm.data.formats.table`).
        first: the first raw record ("array", "lines", "csv"; None when there is none); for
            "object", the whole loaded object.
        sample: the first readable raw records (up to 20; for "object", [the object]), for detection.
    """

    path: Path
    kind: str
    first: Any = None
    data: Any = field(default=None, repr=False)
    sample: list = field(default_factory=list, repr=False)

    def records(self) -> Iterator[Any]:
        """Raw records in file order; for JSON Lines, a bad line yields a `SampleError` instead."""
        if self.kind == "array":
            return iter_json_array(self.path)
        if self.kind == "lines":
            return iter_json_lines(self.path)
        if self.kind == "csv":
            return iter_csv(self.path)
        if self.kind == "table":
            return iter_table_records(self.path)
        raise AssertionError(f"{self.path}: a JSON object file has no record stream; use .data")


def open_source(path: str | Path) -> SourceFile:
    """Open `path` and find its container kind; ValueError when the file is missing, empty or not JSON/CSV."""
    path = Path(path)
    if (path.exists() or is_pattern(path)) and is_table_path(path):
        return _streamed(path, "table")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found (check --data_path)")
    if path.suffix.lower() == ".csv":
        return _streamed(path, "csv")
    if path.suffix.lower() == ".jsonl":
        return _streamed(path, "lines")
    start = _first_char(path)
    if start == "[":
        return _streamed(path, "array")
    if start == "{":
        kind, data = _object_or_lines(path)
        if kind == "lines":
            return _streamed(path, "lines")
        return SourceFile(path, "object", first=data, data=data, sample=[data])
    what = "empty" if start == "" else f"starts with {start!r}"
    raise DataError(f"{path}: {what}; expected a JSON array or object, JSON Lines (.jsonl), CSV (.csv), or a table "
                    "(.parquet, .arrow, a datasets save_to_disk folder)")


def _streamed(path: Path, kind: str) -> SourceFile:
    """A record-stream file with its first record and its first readable records (for detection)."""
    src = SourceFile(path, kind)
    records = src.records()
    try:
        head = list(itertools.islice(records, _DETECT_RECORDS))
    finally:
        records.close()
    src.first = head[0] if head else None
    src.sample = [r for r in head if not isinstance(r, SampleError)]
    return src


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="ignore")  # a bad byte later is reported where it is
    return head.lstrip()[:1]


class NotUtf8Error(DataError):
    """A data file that is not UTF-8 text (the whole file is refused, by name)."""


def _not_utf8(path: Path, error: UnicodeDecodeError, offset: int) -> NotUtf8Error:
    byte = error.object[error.start : error.start + 1].hex()
    return NotUtf8Error(f"{path}: not UTF-8 (byte 0x{byte} at byte {offset + error.start}); {_UTF8_HINT}")


def _lone_surrogate(value: Any) -> bool:
    """True when a string in `value` holds a lone surrogate (`\\ud800`): text no UTF-8 writer or tokenizer takes."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _unparsable(error: Exception) -> str:
    """What a JSON parse failure other than a syntax error means, in words."""
    if isinstance(error, RecursionError):
        return "nested deeper than Python's JSON parser can go"
    if "integer string conversion" in str(error):  # a number longer than int() accepts (4300 digits)
        return f"a number longer than Python reads ({str(error).split(';')[0]}); write it as a string"
    return str(error)


class _JsonStream:
    """A file's text read in chunks, with a cursor; values are decoded in place (no copies of the buffer)."""

    def __init__(self, f, chunk_chars: int):
        self._file, self._chunk = f, chunk_chars
        self._text = codecs.getincrementaldecoder("utf-8-sig")()
        self._decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False
        self.start = 0  # where the last decoded value began in `buf`
        self.bytes_read = 0

    def more(self) -> bool:
        """Append the next chunk (dropping what lies before the cursor); False at end of file."""
        if self.eof:
            return False
        raw = self._file.read(self._chunk)
        self.eof = not raw
        try:
            text = self._text.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:
            raise _not_utf8(Path(self._file.name), e, self.bytes_read) from None
        self.bytes_read += len(raw)
        self.buf = self.buf[self.pos :] + text
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
            self.start, self.pos = self.pos, end  # `more` may have moved the buffer: the value's start is here
            return value

    def skip(self) -> None:
        """Move the cursor past the JSON value at it without parsing it (one too deep or too long for `value`)."""
        if self.peek() not in ('[', '{', '"'):  # a scalar (e.g. a huge number) ends at the next separator
            while True:
                match = _SCALAR_END.search(self.buf, self.pos)
                if match:
                    self.pos = match.start()
                    return
                if not self.more():
                    self.pos = len(self.buf)
                    return
        depth, scan = 0, self.pos
        while True:
            for token in _SKIP_TOKEN.finditer(self.buf, scan):
                text = token.group()
                if text == '"':  # a string running past the buffer: read on and rescan from it
                    scan = token.start()
                    break
                if text[0] != '"':
                    depth += 1 if text in "[{" else -1
                if depth == 0:
                    self.pos = token.end()
                    return
            else:
                scan = len(self.buf)
            offset = self.pos
            if not self.more():
                raise json.JSONDecodeError("unterminated value", self.buf, len(self.buf))
            scan -= offset


def iter_json_array(path: str | Path, chunk_chars: int = _CHUNK_CHARS) -> Iterator[Any]:
    """Yield the elements of the JSON array in `path` one at a time (constant memory per element)."""
    with open(path, "rb") as f:
        stream = _JsonStream(f, chunk_chars)
        if stream.peek() != "[":
            raise DataError(f"{path}: not a JSON array")
        stream.pos += 1
        if stream.peek() == "]":
            return
        for count in itertools.count():
            try:
                value = stream.value()
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: broken JSON in element {count} ({e.msg})") from e
            except NotUtf8Error:
                raise
            except (RecursionError, ValueError) as e:  # too deep, or a number over the digit limit
                try:  # the cursor is still at the element's start
                    stream.skip()
                except json.JSONDecodeError as e2:
                    raise DataError(f"{path}: broken JSON in element {count} ({e2.msg})") from e2
                value = SampleError("bad_schema", f"{Path(path).name} element {count}: {_unparsable(e)}", index=count)
            else:
                if stream.buf.find("\\u", stream.start, stream.pos) != -1 and _lone_surrogate(value):
                    value = SampleError("bad_schema", f"{Path(path).name} element {count}: a string holds a lone "
                                        "surrogate escape (e.g. \\ud800), not text", index=count)
            yield value
            sep = stream.peek()
            if sep == "]":
                return
            if sep != ",":
                raise DataError(f"{path}: expected ',' or ']' after element {count}, found {sep or 'end of file'!r}")
            stream.pos += 1
            stream.peek()


def _object_or_lines(path: Path) -> tuple[str, Any]:
    """("object", the value) for a file holding one JSON object, ("lines", None) when more values follow it."""
    with open(path, "rb") as f:
        stream = _JsonStream(f, _CHUNK_CHARS)
        stream.peek()
        try:
            value = stream.value()
        except NotUtf8Error:
            raise
        except (RecursionError, ValueError) as e:  # a bad first line of JSON Lines, or a bad object file
            if _next_line_starts(path):
                return ("lines", None)
            if isinstance(e, json.JSONDecodeError):
                raise DataError(f"{path}: not valid JSON ({e})") from e
            raise DataError(f"{path}: {_unparsable(e)}") from None
        return ("lines", None) if stream.peek() else ("object", value)


def _next_line_starts(path: Path) -> bool:
    """True when a second line of `path` starts a JSON value (a JSON Lines file whose first line is bad)."""
    with open(path, "rb") as f:
        f.readline()
        return f.readline().lstrip()[:1] in (b"{", b"[")


def iter_json_lines(path: str | Path) -> Iterator[Any]:
    """Yield one parsed value per non-blank line; an unparsable line yields a `bad_schema` SampleError."""
    name = Path(path).name
    # surrogateescape keeps reading past bytes that are not UTF-8 (they become lone surrogates), so one bad
    # line is that line; ASCII lines (most) skip the check
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        index = 0
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            bad_byte = None if line.isascii() else _escaped_byte(line)
            if bad_byte is not None:
                byte, column = bad_byte
                yield SampleError("bad_schema", f"{name} line {lineno}: not UTF-8 (byte 0x{byte:02x} at column "
                                  f"{column}); {_UTF8_HINT}", index=index)
                index += 1
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                value = SampleError("bad_schema", f"{name} line {lineno}: not JSON ({e.msg})", index=index)
            except (RecursionError, ValueError) as e:
                value = SampleError("bad_schema", f"{name} line {lineno}: {_unparsable(e)}", index=index)
            else:
                if "\\u" in line and _lone_surrogate(value):
                    value = SampleError("bad_schema", f"{name} line {lineno}: a string holds a lone surrogate "
                                        "escape (e.g. \\ud800), not text", index=index)
            yield value
            index += 1


def _escaped_byte(line: str) -> tuple[int, int] | None:
    """(the first byte that was not UTF-8, its 1-based column) in a line read with surrogateescape, or None."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        return ord(line[e.start]) - 0xDC00, e.start + 1
    return None


def iter_csv(path: str | Path) -> Iterator[dict[str, str] | SampleError]:
    """Yield one dict per CSV row, keyed by the header row; a row the csv module refuses (a cell over its
    field limit) yields a `bad_schema` SampleError naming its line; a file that is not UTF-8 is a ValueError."""
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f)
        index = 0
        while True:
            try:
                row: dict | SampleError = next(rows)
            except StopIteration:
                return
            except csv.Error as e:
                row = SampleError("bad_schema", f"{path.name} line {rows.reader.line_num}: {e}", index=index)
            except UnicodeDecodeError as e:
                raise NotUtf8Error(f"{path}: not UTF-8 (byte 0x{e.object[e.start:e.start + 1].hex()} near line "
                                 f"{rows.reader.line_num + 1}); {_UTF8_HINT}") from None
            yield row
            index += 1
