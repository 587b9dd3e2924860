"""Tables as data files: Parquet, Arrow IPC, a `datasets` `save_to_disk` folder, a folder of Parquet shards.

    --data_path chartqa/train.parquet          # ChartQA as the hub ships it: image, query, label
    --data_path rlaif_v/                       # Dataset.save_to_disk(...) (state.json + data-*.arrow)
    --data_path shards/                        # train-00000-of-00004.parquet, ...
    --data_path 'chartqa/data/train-*.parquet' # one split of a hub folder (a pattern: quote it)

A table is a record stream like a JSON Lines file (`SourceFile.kind == "table"`): one dict per row, read by
the same readers (`qa_table`, `llava`, the preference readers). Image columns are those whose Arrow type is
the `datasets` Image feature's storage, `struct<bytes: binary, path: string>`, or a list of it
(`Sequence(Image())`, TRL's `images`); in a record such a cell is an `vlm.data.embedded.EmbeddedImage`
reference `{"table", "row", "column", "item"?, "path"}` (a list of them for a list column, None for a null
cell), never the bytes.

Design choices:
- Rows are read in record batches of `_BATCH_ROWS`: a Parquet file through `ParquetFile.iter_batches` with
  the image columns' `bytes` leaves left out (only their `path` leaves are read, so indexing a 10 GB image
  table reads its text columns, not its images); an Arrow IPC file memory-mapped (zero-copy batches; only the
  non-image columns and the image paths become Python objects).
- A `save_to_disk` folder's shards are its `state.json` `_data_files`, in order; a folder without one is
  read as its `*.parquet` shards (else `*.arrow`), sorted by name; a file-name pattern (`train-*.parquet`)
  as the files it matches, sorted. A folder that mixes several splits' shards (the hub's `data/` folder:
  `train-00000-of-00003-….parquet`, `test-…`) and a `DatasetDict` folder are refused in one line naming the
  splits and the `--data_path` that picks one.
- Which reader applies is detected from the first rows as for any file (`vlm.data.formats`); a table needs
  pyarrow (`MissingDependencyError` naming the `tables` extra otherwise).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from vlm.data.embedded import EmbeddedImage, import_pyarrow
from vlm.data.errors import DataError

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
_SHARD = re.compile(r"(.+?)-\d{5}-of-\d{5}")  # datasets' / the hub's shard names: <split>-00000-of-00003...
_BATCH_ROWS = 1024


def is_pattern(path: Path) -> bool:
    """Whether `path` is a file-name pattern (`data/train-*.parquet`) rather than a path."""
    return any(c in path.name for c in "*?")


def is_table_path(path: Path) -> bool:
    """Whether `path` is read as a table: a folder, a file ending in one of `TABLE_SUFFIXES`, or a pattern
    matching such files."""
    return (path.is_dir() and not is_pattern(path)) or path.suffix.lower() in TABLE_SUFFIXES


def table_files(path: Path) -> list[Path]:
    """The table files behind `path`, in row order (module docstring); DataError when there are none."""
    if is_pattern(path):
        files = sorted(f for f in path.parent.glob(path.name) if f.is_file())
        if not files:
            raise DataError(f"no file matches {str(path)!r} (check --data_path)")
        return files
    if path.is_file():
        return [path]
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        try:
            splits = json.loads(splits_file.read_text()).get("splits") or []
        except (OSError, ValueError, AttributeError):
            splits = []
        example = path / (splits[0] if splits else "train")
        raise DataError(f"{path} holds a datasets DatasetDict (splits: {', '.join(map(str, splits)) or '?'}); pass one "
                        f"split's folder, e.g. --data_path {example}")
    state = path / "state.json"
    if state.is_file():
        try:
            names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state}: not a datasets save_to_disk state file ({e}); save the dataset again") from None
        files = [path / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{path}: shard(s) {missing[:3]} listed in state.json are missing; save the dataset again")
        return files
    files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{path} is a folder without .parquet/.arrow files or a datasets state.json; pass a data file "
                        "or a folder written by datasets' save_to_disk")
    splits = sorted({m.group(1) for f in files if (m := _SHARD.match(f.name))})
    if len(splits) > 1:  # the hub's layout: data/train-00000-of-00003-<hash>.parquet, data/test-..., one folder
        raise DataError(f"{path} holds the shards of several splits ({', '.join(splits)}); pass one split's shards, "
                        f"e.g. --data_path '{path / (splits[-1] + '-*.parquet')}'")
    return files


def is_image_type(pa: Any, arrow_type: Any) -> bool:
    """Whether `arrow_type` is the `datasets` Image feature's storage, struct<bytes: binary, path: string>."""
    if not pa.types.is_struct(arrow_type) or {f.name for f in arrow_type} != {"bytes", "path"}:
        return False
    kind = arrow_type.field("bytes").type
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def image_columns(pa: Any, schema: Any) -> dict[str, bool]:
    """{column: is a list of images} for the schema's image columns."""
    found = {}
    for f in schema:
        if is_image_type(pa, f.type):
            found[f.name] = False
        elif (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)) and is_image_type(pa, f.type.value_type):
            found[f.name] = True
    return found


def iter_table_records(path: str | Path) -> Iterator[dict]:
    """One dict per row of the table(s) at `path`, image cells as `EmbeddedImage` references."""
    for file in table_files(Path(path)):
        yield from _file_records(file)


def _file_records(file: Path) -> Iterator[dict]:
    pa = import_pyarrow()
    reference = str(file.resolve())
    try:
        schema, batches = _batches(pa, file)
        images = image_columns(pa, schema)
        row = 0
        for batch in batches:
            rows = batch.drop_columns(list(images)).to_pylist()
            cells = {name: _paths(pa, batch.column(name), is_list) for name, is_list in images.items()}
            for k, record in enumerate(rows):
                for name, is_list in images.items():
                    record[name] = _reference(cells[name][k], reference, row + k, name, is_list)
                yield record
            row += len(rows)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: a damaged or foreign file
        raise DataError(f"{file}: cannot be read as a table ({type(e).__name__}: {e}); is it a Parquet or Arrow "
                        "file? (--data_path)") from None


def _batches(pa: Any, file: Path) -> tuple[Any, Iterator]:
    """(Arrow schema, record batches without image bytes where the format allows)."""
    if file.suffix.lower() == ".parquet":
        parquet = pa.parquet.ParquetFile(file, memory_map=True)
        schema = parquet.schema_arrow
        images = image_columns(pa, schema)
        leaves = [parquet.schema.column(i).path for i in range(len(parquet.schema))]
        wanted = [leaf for leaf in leaves
                  if not (leaf.split(".", 1)[0] in images and leaf.endswith(".bytes"))]
        return schema, parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted, use_threads=False)
    source = pa.memory_map(str(file))
    try:
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(k) for k in range(reader.num_record_batches))
    except pa.ArrowInvalid:  # the stream format, what datasets writes
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)


def _paths(pa: Any, column: Any, is_list: bool) -> list:
    """Per row: the image's stored `path` (a str or None; `False` for a null cell), or a list of them."""
    import pyarrow.compute as pc

    if not is_list:
        paths = pc.struct_field(column, "path").to_pylist()
        return [p if valid else False for p, valid in zip(paths, column.is_valid().to_pylist())]
    lengths = pc.list_value_length(column).to_pylist()
    flat = pc.struct_field(pc.list_flatten(column), "path").to_pylist()
    out, at = [], 0
    for n in lengths:
        if n is None:
            out.append(False)
            continue
        out.append(flat[at : at + n])
        at += n
    return out


def _reference(cell: Any, table: str, row: int, column: str, is_list: bool) -> Any:
    if cell is False:
        return None
    if not is_list:
        return EmbeddedImage(table=table, row=row, column=column, path=cell)
    return [EmbeddedImage(table=table, row=row, column=column, item=k, path=p) for k, p in enumerate(cell)]
