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
- Rows are read in record batches of `_BATCH_ROWS` from a memory-mapped Arrow IPC file (zero-copy batches;
  only the non-image columns and the image paths become Python objects, the image bytes stay in the map).
- A Parquet file with image columns is first copied, once, to an Arrow IPC file in the table cache
  (`table_cache_dir`: `$VLM_TABLE_CACHE`, else `~/.cache/vlm/tables`; named by the file's path, size and
  mtime), streamed 64 rows at a time; its image cells then point into the copy. This is what `datasets`'
  `load_dataset` does with Parquet, and for the same reason: Parquet compresses each row group's column as a
  whole, so reading one image at random costs decoding its whole row group (~100 images; measured 11 ms per
  image against 0.3 ms from Arrow, bench/RESULTS.md), while an Arrow cell is a slice of the map. The copy
  costs one sequential read of the file and its size on disk. A Parquet file without image columns is read
  directly, in batches.
- A `save_to_disk` folder's shards are its `state.json` `_data_files`, in order; a folder without one is
  read as its `*.parquet` shards (else `*.arrow`), sorted by name; a file-name pattern (`train-*.parquet`)
  as the files it matches, sorted. A folder that mixes several splits' shards (the hub's `data/` folder:
  `train-00000-of-00003-….parquet`, `test-…`) and a `DatasetDict` folder are refused in one line naming the
  splits and the `--data_path` that picks one.
- Which reader applies is detected from the first rows as for any file (`vlm.data.formats`); a table needs
  pyarrow (`MissingDependencyError` naming the `tables` extra otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from vlm.data.embedded import EmbeddedImage, import_pyarrow
from vlm.data.errors import DataError

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
TABLE_CACHE_ENV = "VLM_TABLE_CACHE"
_COPY_ROWS = 64  # rows per batch while copying Parquet to Arrow (the peak is about two row groups: RESULTS.md)
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
    try:
        if file.suffix.lower() == ".parquet" and image_columns(pa, pa.parquet.read_schema(file)):
            file = arrow_copy(pa, file)  # cells are then read from the memory-mapped copy (module docstring)
        reference = str(file.resolve())
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


def table_cache_dir() -> Path:
    """Where Arrow copies of Parquet image tables go: `$VLM_TABLE_CACHE`, else `$XDG_CACHE_HOME/vlm/tables`
    (`~/.cache/vlm/tables`)."""
    if os.environ.get(TABLE_CACHE_ENV):
        return Path(os.environ[TABLE_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlm" / "tables"


def arrow_copy(pa: Any, parquet: Path) -> Path:
    """The Arrow IPC copy of a Parquet file, made on first use (streamed `_COPY_ROWS` rows at a time) and kept,
    named by the file's path, size and mtime, so a changed file gets a new copy. Written to a temporary name
    and renamed: processes making it at once (DDP ranks) each finish a whole file, and the last rename wins."""
    st = parquet.stat()
    key = hashlib.sha256(f"{parquet.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    copy = table_cache_dir() / f"{parquet.name[:60]}-{key}.arrow"  # named after its source in messages
    if copy.is_file():
        return copy
    copy.parent.mkdir(parents=True, exist_ok=True)
    tmp = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
    # read in 1 MiB pieces, not mapped (mapped pages would count as this process's memory): the peak is about
    # two row groups' image column (bench/RESULTS.md), whatever the file's size
    source = pa.parquet.ParquetFile(parquet, buffer_size=1 << 20, pre_buffer=False)
    pool = pa.default_memory_pool()
    try:
        with pa.ipc.new_file(str(tmp), source.schema_arrow) as writer:
            for batch in source.iter_batches(batch_size=_COPY_ROWS, use_threads=False):
                writer.write_batch(batch)
                del batch
                pool.release_unused()  # the allocator (mimalloc) keeps freed batches otherwise
        os.replace(tmp, copy)
    finally:
        del source
        pool.release_unused()
        tmp.unlink(missing_ok=True)
    return copy


def _batches(pa: Any, file: Path) -> tuple[Any, Iterator]:
    """(Arrow schema, record batches): Parquet read in batches, Arrow memory-mapped (zero-copy)."""
    if file.suffix.lower() == ".parquet":  # no image column (those are read from their Arrow copy)
        parquet = pa.parquet.ParquetFile(file, memory_map=True)
        return parquet.schema_arrow, parquet.iter_batches(batch_size=_BATCH_ROWS, use_threads=False)
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
