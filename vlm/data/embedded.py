"""Embedded images: images stored inside a table, read from the memory-mapped file when a sample uses them.

An `images` entry of a canonical sample may be an embedded image (DESIGN.md, `vlm.data.sample`):
- `{"bytes": <the encoded image file>, "path": str | None}`, as the `datasets` Image feature stores it, in
  memory (samples built in Python);
- `{"table": <file>, "row": int, "column": str, "item"?: int, "path": str | None}`: the cell `column` of row
  `row` of an Arrow IPC file (`item`: the position in a list-of-images cell), which holds the
  `{"bytes", "path"}` struct (a Parquet source's cells point into its Arrow copy, `vlm.data.formats.table`).
  The table readers (`vlm.data.formats.table`) produce this form, as an
  `EmbeddedImage` (a dict, so it stores as JSON like any sample; the subclass tells readers that the value
  came from a table cell and was not written in a JSON data file).

Design choices:
- Nothing holds image bytes between uses: a stored sample keeps the reference (a few dozen bytes whatever the
  image's size); `read_bytes` opens the file on first use in this process and keeps it open, memory-mapped
  (`_TABLES`, keyed by path, size and mtime, so a rewritten file is opened again). Arrow IPC files (stream
  format, what `datasets.save_to_disk` writes, or file format) are mapped whole; reading a cell is a zero-copy
  slice of the map and one copy of that image's bytes; the pages touched are the file's, which the OS can
  drop again at will (they are not the process's own memory).
- A cell whose `bytes` is null but whose `path` is set (the Image feature pointing at a file instead of
  embedding it) is the image file `path` under the source's image folder, with the folder's safety rules
  (`vlm.data.paths.ImageFolder` does that; here it is `EmbeddedPath`).
- The per-process cache is module state built on first use (DataLoader workers open their own; forked ones may
  reuse the parent's read-only maps); no sample or dataset object holds a file handle, so they pickle.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from vlm.data.errors import SampleError
from vlm.errors import MissingDependencyError

_LOCK = threading.Lock()
_TABLES: dict[str, tuple[tuple, Any]] = {}  # path -> ((size, mtime_ns), _Arrow)


class EmbeddedImage(dict):
    """A table-cell reference produced by a table reader (module docstring); a plain dict once stored."""


class EmbeddedPath(Exception):
    """Raised by `read_bytes` for a cell that names an image file (`path`) instead of holding its bytes."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


def describe(image: dict) -> str:
    """A short name for an embedded image in messages: `<file> row <r> column <c>[<item>]` or `<N bytes>`."""
    if "bytes" in image:
        return f"embedded image {image.get('path') or ''!s}<{len(image['bytes'] or b'')} bytes>"
    item = f"[{image['item']}]" if image.get("item") is not None else ""
    return f"image in {os.path.basename(image['table'])} row {image['row']} column {image['column']!r}{item}"


def read_bytes(image: dict) -> bytes:
    """The encoded image file of an embedded image.

    Raises:
        SampleError: `missing_image` when the table file, the row, the column or the cell's bytes are gone;
            `unreadable_image` when the file cannot be read as a table.
        EmbeddedPath: the cell has no bytes but names an image file (`path`).
    """
    if "bytes" in image:
        if image["bytes"] is None:
            return _no_bytes(image)
        return bytes(image["bytes"])
    table = _open(image["table"])
    cell = table.cell(image["row"], image["column"], describe(image))
    if image.get("item") is not None:
        values = cell.values if cell.is_valid else None
        if values is None or image["item"] >= len(values):
            raise SampleError("missing_image", f"{describe(image)}: the cell holds no image number {image['item']}")
        cell = values[image["item"]]
    if not cell.is_valid:
        raise SampleError("missing_image", f"{describe(image)}: the cell is empty")
    data = cell["bytes"]
    if not data.is_valid:
        path = cell["path"].as_py() if "path" in cell.keys() else None
        return _no_bytes({**image, "path": path})
    return data.as_buffer().to_pybytes()


def _no_bytes(image: dict) -> bytes:
    if image.get("path"):
        raise EmbeddedPath(image["path"])
    raise SampleError("missing_image", f"{describe(image)}: neither bytes nor a path")


def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401  (vlm.data.formats.table reads Parquet through it)
    except ImportError:
        raise MissingDependencyError("reading Parquet/Arrow tables needs pyarrow: pip install 'vlm-kit[tables]'") from None
    return pyarrow


def _open(path: str):
    """The opened table at `path`, from the cache when the file is unchanged."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SampleError("missing_image", f"the table {path!r} holding the image cannot be opened: {e.strerror}") from None
    stamp = (st.st_size, st.st_mtime_ns)
    with _LOCK:
        cached = _TABLES.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            table = _Arrow(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise SampleError("unreadable_image", f"the table {path!r} holding the image cannot be read: {e}") from None
        _TABLES[path] = (stamp, table)
        return table


class _Arrow:
    """An Arrow IPC file (stream or file format) mapped whole; cells are zero-copy slices of the map."""

    def __init__(self, path: str):
        pa = import_pyarrow()
        source = pa.memory_map(path)
        try:
            reader = pa.ipc.open_file(source)
            self.table = reader.read_all()
        except pa.ArrowInvalid:  # not the file format: the stream format `datasets` writes
            source.seek(0)
            self.table = pa.ipc.open_stream(source).read_all()

    def cell(self, row: int, column: str, where: str):
        if column not in self.table.column_names:
            raise SampleError("missing_image", f"{where}: the table has no column {column!r}")
        if row >= self.table.num_rows:
            raise SampleError("missing_image", f"{where}: the table has {self.table.num_rows} rows")
        return self.table.column(column)[row]
