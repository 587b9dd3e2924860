"""The Basic-VLM pair of files: an image map and a captions file (`--image_map`, `--captions_file`).

Two layouts are read:
- Basic-VLM's own (`dataprocess/process_image.py`): `image_map.json` =
  `{"<name>": {"image_file": "<file>", "ID": n, "path": "<folder>"}}` and `captions.json` =
  `{"<n>": {"q": "<question with <|extra_0|> where the image goes>", "a": caption | [captions]}}`;
  one entry of the image map is one record. `<|extra_0|>` becomes `<image>`; a question without it
  gets `<image>\\n` in front; an empty question becomes `prompt`. The map's `path` is the folder of
  the image: Basic-VLM's train.sh passes no image folder, and then (`map_image_root`, the `image_root`
  option) each image is found at `path/image_file`, a relative `path` taken from the current folder as
  Basic-VLM's own loader opens it. With an image folder given, `image_file` is relative to it.
- a simple one: image map `{"<image id>": "<file>"}` and captions
  `[{"image_id": ..., "caption" | "captions": str | [str]}]`; the question is `prompt`.

Either file may be given as the data path; the other comes from the `image_map` / `captions_file`
option or lies beside it as `image_map.json` / `captions.json`. Several captions per image follow
`caption_mode` as for AI Challenger. A record whose image id is not in the map is `bad_schema`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from vlm.data.errors import DataError, SampleError
from vlm.data.formats.common import (
    IMAGE,
    bad,
    caption_list,
    caption_samples,
    check_caption_mode,
    prompt_text,
    record_id,
)
from vlm.data.formats.source import SourceFile, open_source

NAME = "basic_vlm"
DEFAULT_PROMPT = "请描述这张图片。"
IMAGE_MAP_FILE = "image_map.json"
CAPTIONS_FILE = "captions.json"
IMAGE_MARKER = "<|extra_0|>"  # where Basic-VLM's questions put the image (a Qwen-1 special token)


def mark_image(text: str) -> str:
    """Basic-VLM's image marker `<|extra_0|>` -> `<image>` (training questions and inference prompts alike)."""
    return text.replace(IMAGE_MARKER, IMAGE)


def _first_value(src: SourceFile) -> Any:
    return next(iter(src.first.values()), None) if src.kind == "object" and isinstance(src.first, dict) else None


def _is_image_map(src: SourceFile) -> bool:
    value = _first_value(src)
    return isinstance(value, str) or (isinstance(value, dict) and "image_file" in value)


def _is_qa_captions(src: SourceFile) -> bool:
    value = _first_value(src)
    return isinstance(value, dict) and "a" in value


def _is_caption_list(src: SourceFile) -> bool:
    first = src.first
    return src.kind in ("array", "lines") and isinstance(first, dict) and "image_id" in first and (
        "caption" in first or "captions" in first
    )


def image_map_path(src: SourceFile, image_map: str | None) -> Path | None:
    """The image map for captions file `src`: the option, else `image_map.json` beside it, else None."""
    if image_map:
        return Path(image_map)
    beside = src.path.with_name(IMAGE_MAP_FILE)
    return beside if beside.is_file() and beside != src.path else None


def map_image_root(data_file: str | Path, image_map: str | None = None) -> str | None:
    """The folder the image map's `path` fields lie under (their common folder), or None when no entry has one.

    `data_file` is the captions file or the image map itself; the map is `image_map` when given, else the
    data file if it is one, else `image_map.json` beside it. Pass the result as the source's image folder
    and as the reader's `image_root` option.
    """
    src = open_source(data_file)
    if not _is_image_map(src):
        found = image_map_path(src, image_map)
        if found is None or not found.is_file():
            return None
        src = open_source(found)
    if src.kind != "object":
        return None
    folders = {os.path.abspath(entry["path"]) for entry in src.data.values()
               if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]}
    return os.path.commonpath(sorted(folders)) if folders else None


def image_folder_and_options(data_file: str | Path, image_map: str | None,
                             image_folder: str | None) -> tuple[str | None, dict[str, Any]]:
    """(image folder, reader options) for a Basic-VLM pair: `image_folder` when given; otherwise, as
    Basic-VLM's train.sh runs, the image map's `path` folders (`map_image_root`, passed as `image_root`).
    Training and `vlm data check/convert` both use this, so the check finds the images training finds."""
    options: dict[str, Any] = {"image_map": image_map} if image_map else {}
    if image_folder is not None:
        return image_folder, options
    root = map_image_root(data_file, image_map)
    if root is not None:
        options["image_root"] = root
    return root, options


def _image_of(entry: Any, image_root: str | None) -> str | None:
    """An image-map entry's image path, relative to `image_root` when given (see the module docstring)."""
    file = entry.get("image_file") if isinstance(entry, dict) else entry
    if not isinstance(file, str):
        return None
    folder = entry.get("path") if isinstance(entry, dict) else None
    if image_root is None or not isinstance(folder, str) or not folder:
        return file
    return os.path.relpath(os.path.join(os.path.abspath(folder), file), image_root)


def detect(src: SourceFile, *, image_map: str | None = None, captions_file: str | None = None, **options: Any) -> bool:
    if _is_qa_captions(src):
        return True
    if _is_image_map(src):
        return bool(captions_file) or src.path.with_name(CAPTIONS_FILE).is_file()
    return _is_caption_list(src) and image_map_path(src, image_map) is not None


def read(
    src: SourceFile,
    *,
    image_map: str | None = None,
    captions_file: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    caption_mode: str = "each",
    seed: int = 0,
    system: str | None = None,
    image_root: str | None = None,
) -> Iterator[dict | SampleError]:
    """Samples of a Basic-VLM pair; `image_root` (from `map_image_root`): images at the map's `path` fields."""
    check_caption_mode(caption_mode)
    if _is_image_map(src):
        captions_path = Path(captions_file) if captions_file else src.path.with_name(CAPTIONS_FILE)
        map_src, captions_src = src, open_source(captions_path)
    else:
        found = image_map_path(src, image_map)
        if found is None:
            raise DataError(
                f"{src.path}: a Basic-VLM captions file needs its image map; pass image_map= "
                f"(--image_map) or put {IMAGE_MAP_FILE} beside it"
            )
        map_src, captions_src = open_source(found), src
    if map_src.kind != "object":
        raise DataError(f"{map_src.path}: a Basic-VLM image map must be a JSON object of image id -> file")
    options = dict(caption_mode=caption_mode, seed=seed, system=system)
    if _is_qa_captions(captions_src):
        yield from _read_qa(map_src, captions_src, prompt=prompt, image_root=image_root, **options)
    else:
        yield from _read_list(map_src, captions_src, prompt=prompt, image_root=image_root, **options)


def _read_qa(map_src: SourceFile, captions_src: SourceFile, *, prompt: str, image_root: str | None,
             **options: Any) -> Iterator[dict | SampleError]:
    """Basic-VLM's layout: one record per image-map entry, its caption entry looked up by `ID`."""
    captions: dict = captions_src.data
    for index, (name, entry) in enumerate(map_src.data.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("image_file"), str):
            yield bad(f"image map entry {name!r} has no 'image_file'", map_src.path, index)
            continue
        sample_id = record_id(entry.get("ID"), map_src.path, index)
        qa = captions.get(str(entry.get("ID")))
        if not isinstance(qa, dict):
            yield bad(f"ID {entry.get('ID')!r} has no entry in {captions_src.path.name}", map_src.path, index, sample_id)
            continue
        question = qa.get("q") or ""
        try:
            answers = caption_list(qa.get("a"))
            if not isinstance(question, str):
                raise TypeError(f"'q' must be a string, got {question!r:.80}")
        except TypeError as e:
            yield bad(str(e), map_src.path, index, sample_id)
            continue
        question = mark_image(question)
        if not question:
            user = prompt_text(prompt)
        else:
            user = question if IMAGE in question else f"{IMAGE}\n{question}"
        yield from caption_samples(sample_id, _image_of(entry, image_root), answers, user=user, **options)


def _read_list(map_src: SourceFile, captions_src: SourceFile, *, prompt: str, image_root: str | None,
               **options: Any) -> Iterator[dict | SampleError]:
    """The simple layout: one record per captions entry, its image looked up in the map by `image_id`."""
    files: dict = map_src.data
    if captions_src.kind == "object":
        raise DataError(
            f"{captions_src.path}: expected Basic-VLM captions ({{id: {{q, a}}}}) or a list of {{image_id, caption}}"
        )
    for index, record in enumerate(captions_src.records()):
        if isinstance(record, SampleError):
            yield record
            continue
        if not isinstance(record, dict):
            yield bad(f"expected an object, got {type(record).__name__}", captions_src.path, index)
            continue
        sample_id = record_id(record.get("image_id"), captions_src.path, index)
        file = _image_of(files.get(str(record.get("image_id"))), image_root)
        if file is None:
            yield bad(f"image_id {record.get('image_id')!r} is not in {map_src.path.name}", captions_src.path, index, sample_id)
            continue
        try:
            captions = caption_list(record.get("caption", record.get("captions")))
        except TypeError as e:
            yield bad(str(e), captions_src.path, index, sample_id)
            continue
        yield from caption_samples(sample_id, file, captions, user=prompt_text(prompt), **options)
