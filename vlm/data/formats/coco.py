"""COCO caption annotations (`captions_train2017.json`): one caption sample per annotation.

File: `{"images": [{"id", "file_name"}, ...], "annotations": [{"id", "image_id", "caption"}, ...]}`.
Each annotation becomes the `plain` pre-training pair: user `<image>` (or `<image>\\n{prompt}` when
a prompt is given), assistant the caption, after an optional `system` message. The sample id is the annotation id. An annotation whose
image is not listed, or whose caption is not a string, is `bad_schema`.
"""

from __future__ import annotations

from typing import Any, Iterator

from vlm.data.errors import SampleError
from vlm.data.formats.common import bad, caption_samples, prompt_text, record_id
from vlm.data.formats.source import SourceFile

NAME = "coco"


def detect(src: SourceFile, **options: Any) -> bool:
    data = src.first
    return src.kind == "object" and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)


def read(src: SourceFile, *, prompt: str = "", system: str | None = None) -> Iterator[dict | SampleError]:
    files: dict[Any, str] = {}
    for image in src.data["images"]:
        if isinstance(image, dict) and isinstance(image.get("file_name"), str):
            files[image.get("id")] = image["file_name"]
    for index, ann in enumerate(src.data["annotations"]):
        if not isinstance(ann, dict):
            yield bad(f"annotation is not an object: {ann!r:.80}", src.path, index)
            continue
        sample_id = record_id(ann.get("id"), src.path, index)
        if ann.get("image_id") not in files:
            yield bad(f"image_id {ann.get('image_id')!r} is not in 'images'", src.path, index, sample_id)
        elif not isinstance(ann.get("caption"), str):
            yield bad(f"caption must be a string, got {ann.get('caption')!r:.80}", src.path, index, sample_id)
        else:
            image, captions = files[ann["image_id"]], [ann["caption"]]
            yield from caption_samples(
                sample_id, image, captions, user=prompt_text(prompt), caption_mode="each", seed=0, system=system
            )
