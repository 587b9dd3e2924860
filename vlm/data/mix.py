"""Several data sources, each with its own image folder, mixed into one indexed list of records.

    # command line: one image folder per path, or one for all; optional weights
    --data_path coco_llava.json,aic_captions.json --image_folder coco/train2017,aic/images --data_weights 1,0.5

    # or a YAML mix file passed as --data_path mix.yaml (paths relative to the YAML file):
    - path: coco/llava_coco.json          # COCO captions already in LLaVA form
      image_folder: coco/train2017
    - path: aic/caption_train_annotations_20170902.json
      image_folder: aic/caption_train_images_20170902
      format: ai_challenger               # optional; detected otherwise
      caption_mode: sample                # any other key is a reader option
      repeat: 0.5                         # or weight: 0.5
      max_samples: 100000

Design choices:
- `weight` is a *repeat factor*, not a fraction of the mix: a source with weight 2 appears twice per
  epoch, 0.5 contributes a random half of its records, 0 drops it. `repeat` is the same thing under
  its own name (give one of the two). `max_samples` first caps the source to a random subset of
  that many records (kept in file order); the repeat factor applies to what is left. All random
  choices use an RNG seeded by (`seed`, source path), so the mix is reproducible and adding a source
  does not change the others' choices. Readers that sample (one caption per image) get the same
  `seed` unless their source sets its own.
- Records are stored compactly: each canonical sample as its compact JSON bytes (the `meta` fields
  dropped unless `keep_meta`), a reader's error as a (reason, detail, id) tuple; the mixed order is an
  array of record numbers, so repeating a source costs 8 bytes per repeat, not a copy. A source is
  read once, streamed; nothing holds nested dicts for the whole file.
- The object holds no open file and pickles cheaply enough for DataLoader workers (fork shares it).
"""

from __future__ import annotations

import json
import math
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from vlm.data.errors import DataError, SampleError
from vlm.data.formats import detect_format, detection_summary, format_votes, read_opened, reader_options, resolve_format
from vlm.data.formats.source import open_source
from vlm.data.formats.table import is_table_path
from vlm.data.paths import ImageFolder

MIX_SUFFIXES = (".yaml", ".yml")
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # stateless; built once
_SOURCE_KEYS = ("path", "image_folder", "format", "weight", "repeat", "max_samples")


@dataclass
class Source:
    """One data file and how it enters the mix.

    Attributes:
        path: the data file.
        image_folder: folder its image paths are relative to (None: text-only source).
        format: "auto" or a reader name (`vlm.data.formats.FORMATS`).
        repeat: repeat factor (see module docstring); `weight` in mix files and `--data_weights`.
        max_samples: cap on the records taken from this source (random subset), None for all.
        options: reader options for this source; an option its reader does not take is an error.
        shared_options: command-line reader options: applied when this source's reader takes them.
        allow_absolute_images: accept absolute image paths (`--allow_absolute_image_paths`; `vlm.data.paths`).
    """

    path: str
    image_folder: str | None = None
    format: str = "auto"
    repeat: float = 1.0
    max_samples: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    shared_options: dict[str, Any] = field(default_factory=dict)
    allow_absolute_images: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, (int, float)) or not self.repeat >= 0:
            raise DataError(f"{self.path}: repeat/weight must be a number >= 0, got {self.repeat!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 0):
            raise DataError(f"{self.path}: max_samples must be an int >= 0, got {self.max_samples!r}")

    def reader_kwargs(self, format: str) -> dict[str, Any]:
        """Options for reader `format`: all of `options`, and the `shared_options` it accepts."""
        accepted = set(reader_options(format))
        return {**{k: v for k, v in self.shared_options.items() if k in accepted}, **self.options}


def _split(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v) for v in value]


def parse_sources(
    data_path: str | Sequence[str],
    image_folder: str | Sequence[str] | None = None,
    *,
    data_format: str | Sequence[str] = "auto",
    weights: str | Sequence[float] | None = None,
    options: dict[str, Any] | None = None,
) -> list[Source]:
    """Sources from command-line style values (comma-separated strings or lists).

    A single `data_path` ending in .yaml/.yml is a mix file (`load_mix_file`); `image_folder`,
    `data_format` and `weights` must then be left at their defaults. One image folder (or format)
    applies to every path; otherwise give one per path. `options` are shared reader options
    (`Source.shared_options`).
    """
    paths = _split(data_path)
    if not paths:
        raise DataError("no --data_path given")
    if len(paths) == 1 and paths[0].lower().endswith(MIX_SUFFIXES):
        if _split(image_folder) or _split(weights) or _split(data_format) not in ([], ["auto"]):
            raise DataError(
                f"{paths[0]} is a mix file: give image folders, formats and weights inside it, not as flags"
            )
        return load_mix_file(paths[0], shared_options=options)
    folders = _per_path("--image_folder", _split(image_folder), paths, None)
    formats = _per_path("--data_format", _split(data_format), paths, "auto")
    repeats = [float(w) for w in _per_path("--data_weights", _split(weights), paths, 1.0)]
    return [
        Source(path=p, image_folder=f, format=fmt, repeat=r, shared_options=dict(options or {}))
        for p, f, fmt, r in zip(paths, folders, formats, repeats)
    ]


def _per_path(flag: str, values: list, paths: list[str], default: Any) -> list:
    if not values:
        return [default] * len(paths)
    if len(values) == 1:
        return values * len(paths)
    if len(values) != len(paths):
        raise DataError(f"{flag} has {len(values)} values for {len(paths)} --data_path entries; give one, or one per path")
    return values


def load_mix_file(path: str | Path, *, shared_options: dict[str, Any] | None = None) -> list[Source]:
    """Sources from a YAML mix file: a list of {path, image_folder?, format?, weight?|repeat?, max_samples?, <reader options>}.

    Relative paths (data files, image folders, `image_map`, `captions_file`) are taken relative to
    the mix file's folder. A mapping with a `sources` list is accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mix file {str(path)!r} not found (check --data_path)")
    try:
        spec = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}); re-save the mix file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DataError(f"{path}: not valid YAML{where}: {problem}; fix the mix file (a list of {{path, image_folder, ...}})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to read; a mix file is a flat list of sources") from None
    if isinstance(spec, dict) and set(spec) == {"sources"}:
        spec = spec["sources"]
    if not isinstance(spec, list) or not spec:
        raise DataError(f"{path}: a mix file is a non-empty list of sources ({{path, image_folder, ...}})")
    base = path.parent
    sources = []
    for k, entry in enumerate(spec):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise DataError(f"{path}: source {k} must be a mapping with a 'path', got {entry!r:.100}")
        if "weight" in entry and "repeat" in entry:
            raise DataError(f"{path}: source {k} gives both 'weight' and 'repeat'; they mean the same, give one")
        where = f"{path}: source {k} ({entry['path']})"
        for key in ("image_folder", "format"):
            if key in entry and not isinstance(entry[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {entry[key]!r:.80}")
        options = {key: value for key, value in entry.items() if key not in _SOURCE_KEYS}
        for key in ("image_map", "captions_file"):
            if isinstance(options.get(key), str):
                options[key] = str(base / options[key])
        folder = entry.get("image_folder")
        data_file = base / entry["path"]
        if not (data_file.is_file() or is_table_path(data_file)):  # a table may be a folder or a pattern
            raise DataError(f"{where}: data file {str(data_file)!r} not found (paths are relative to the mix file's folder)")
        try:
            source = Source(
                path=str(data_file),
                image_folder=None if folder is None else str(base / folder),
                format=entry.get("format", "auto"),
                repeat=entry.get("weight", entry.get("repeat", 1.0)),
                max_samples=entry.get("max_samples"),
                options=options,
                shared_options=dict(shared_options or {}),
            )
        except ValueError as e:
            raise DataError(f"{where}: {str(e).removeprefix(str(data_file) + ': ')}") from None
        sources.append(source)
    return sources


def iter_source(source: Source, *, seed: int | None = None) -> tuple[str, Iterator[dict | SampleError]]:
    """(format name, samples or SampleErrors) of one source; format detected when "auto".

    `seed` is passed on to a reader that takes one (caption sampling) unless the source sets its own.
    """
    fmt, samples, _ = open_source_records(source, seed=seed)
    return fmt, samples


def open_source_records(source: Source, *, seed: int | None = None) -> tuple[str, Iterator[dict | SampleError], str]:
    """`iter_source`, plus in words how the format was chosen (what detection saw, or "given")."""
    src = open_source(source.path)
    if source.format == "auto":
        options = {**source.shared_options, **source.options}
        fmt = detect_format(src, **options)
        how = f"detected: {detection_summary(src, format_votes(src, **options))}"
    else:
        fmt = resolve_format(src, source.format, {})
        how = "given"
    kwargs = source.reader_kwargs(fmt)
    resolve_format(src, fmt, kwargs)  # rejects per-source options the reader does not take
    if seed is not None and "seed" in reader_options(fmt):
        kwargs.setdefault("seed", seed)
    return fmt, read_opened(src, fmt, kwargs), how


def check_shared_options(sources: Sequence[Source], formats: Sequence[str]) -> None:
    """ValueError for a command-line reader option that no source's reader takes (a typo or a wrong format)."""
    shared = {k for s in sources for k in s.shared_options}
    used = {k for s, f in zip(sources, formats) for k in s.shared_options if k in reader_options(f)}
    unused = sorted(shared - used)
    if unused:
        raise DataError(f"reader option(s) {unused} apply to none of the sources (formats: {', '.join(formats)})")


def mix_positions(num_records: int, source: Source, seed: int) -> list[int]:
    """Positions (within the source) in the mixed order: `max_samples` subset, then the repeat factor."""
    rng = random.Random(f"{seed}:{source.path}")
    base = list(range(num_records))
    if source.max_samples is not None and source.max_samples < num_records:
        base = sorted(rng.sample(base, source.max_samples))
    whole = math.floor(source.repeat)
    extra = round((source.repeat - whole) * len(base))
    return base * whole + sorted(rng.sample(base, extra))


class MixedRecords(Sequence):
    """All sources read, stored compactly, and put in mixed order; `records[i]` -> (sample | SampleError, folder, where).

    Attributes:
        sources: the sources, in order.
        formats: the format each source was read as.
        source_counts: records each source produced (before mixing).
    """

    def __init__(self, sources: Sequence[Source], *, seed: int = 0, keep_meta: bool = False):
        if not sources:
            raise DataError("no data sources given")
        self.sources = list(sources)
        self.folders = [ImageFolder(s.image_folder, allow_absolute=s.allow_absolute_images) for s in self.sources]
        self.source_counts: list[int] = []
        self._blobs: list[bytes | tuple[str, str, str | None]] = []
        self._record_source = array("H")
        self._record_pos = array("q")  # position of the record within its source
        self._num_images = array("H")
        opened = [open_source_records(s, seed=seed) for s in self.sources]  # detect every format before reading any
        self.formats = [fmt for fmt, _, _ in opened]
        self.format_origins = [how for _, _, how in opened]
        check_shared_options(self.sources, self.formats)
        order = array("q")
        for k, (source, (_, samples, _)) in enumerate(zip(self.sources, opened)):
            first = len(self._blobs)
            for pos, item in enumerate(samples):
                self._add(item, k, pos, keep_meta)
            count = len(self._blobs) - first
            self.source_counts.append(count)
            order.extend(first + p for p in mix_positions(count, source, seed))
        self._order = order

    def _add(self, item: dict | SampleError, source: int, pos: int, keep_meta: bool) -> None:
        if isinstance(item, SampleError):
            self._blobs.append((item.reason, item.detail, item.sample_id))
            self._num_images.append(0)
        else:
            if not keep_meta and "meta" in item:
                item = {k: v for k, v in item.items() if k != "meta"}
            try:
                blob = _COMPACT_JSON.encode(item).encode()
            except UnicodeEncodeError:  # a lone surrogate from a reader that does not check (object files)
                error = SampleError("bad_schema", f"{self.sources[source].path} record {pos}: a string holds a lone "
                                    "surrogate (e.g. \\ud800), not text", sample_id=item.get("id"))
                self._add(error, source, pos, keep_meta)
                return
            self._blobs.append(blob)
            images = item.get("images")
            self._num_images.append(min(len(images), 65535) if isinstance(images, list) else 0)
        self._record_source.append(source)
        self._record_pos.append(pos)

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index: int) -> tuple[dict | SampleError, ImageFolder, str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        record = self._order[index]
        blob = self._blobs[record]
        where = self.where(index)
        if isinstance(blob, tuple):
            reason, detail, sample_id = blob
            item: dict | SampleError = SampleError(reason, detail, index=index, sample_id=sample_id)
        else:
            item = json.loads(blob)
        return item, self.folders[self._record_source[record]], where

    def where(self, index: int) -> str:
        """`<file> sample <n>`: where mixed record `index` comes from."""
        record = self._order[index]
        return f"{self.sources[self._record_source[record]].path} sample {self._record_pos[record]}"

    def record_of(self, index: int) -> int:
        """The stored record behind mixed position `index` (equal for the repeats of one record)."""
        return self._order[index]

    def stored_size(self, index: int) -> int:
        """Bytes of the stored record behind `index` (a cheap size estimate; 0 for reader errors)."""
        blob = self._blobs[self._order[index]]
        return 0 if isinstance(blob, tuple) else len(blob)

    def num_images(self, index: int) -> int:
        return self._num_images[self._order[index]]

    def describe(self) -> list[dict[str, Any]]:
        """Per source: path, image folder, format, records read, records in the mix."""
        in_mix = [0] * len(self.sources)
        for record in self._order:
            in_mix[self._record_source[record]] += 1
        return [
            {"path": s.path, "image_folder": s.image_folder, "format": f, "records": n, "in_mix": m}
            for s, f, n, m in zip(self.sources, self.formats, self.source_counts, in_mix)
        ]

    def format_detection(self) -> list[dict[str, str]]:
        """Per source: its format and how it was chosen (given, or what detection saw)."""
        return [{"path": s.path, "format": f, "how": how}
                for s, f, how in zip(self.sources, self.formats, self.format_origins)]
