"""AI Challenger image captions (`caption_train_annotations_*.json`).

Record: `{"url"?, "image_id": "<file name>.jpg", "caption": [five Chinese sentences]}` (a single
string is accepted too). Every record is an image with captions; the question is a fixed prompt
(`prompt`, default "请描述这张图片。" — "describe this picture"). `caption_mode="each"` makes one
sample per caption (ids `<image_id>:<k>`), `"sample"` one sample per image with a caption chosen by
an RNG seeded with (`seed`, image id), reproducible whatever the file order.

Detection: a list of `{image_id, caption}` is this format unless a Basic-VLM `image_map` is given
or lies beside the file (then it is `basic_vlm`).
"""

from __future__ import annotations

from typing import Any, Iterator

from vlm.data.errors import SampleError
from vlm.data.formats.basic_vlm import image_map_path
from vlm.data.formats.common import bad, caption_list, caption_samples, check_caption_mode, prompt_text
from vlm.data.formats.source import SourceFile

NAME = "ai_challenger"
DEFAULT_PROMPT = "请描述这张图片。"


def detect(src: SourceFile, **options: Any) -> bool:
    first = src.first
    return (
        src.kind in ("array", "lines")
        and isinstance(first, dict)
        and "image_id" in first
        and "caption" in first
        and image_map_path(src, options.get("image_map")) is None
    )


def read(
    src: SourceFile,
    *,
    prompt: str = DEFAULT_PROMPT,
    caption_mode: str = "each",
    seed: int = 0,
    system: str | None = None,
) -> Iterator[dict | SampleError]:
    check_caption_mode(caption_mode)
    user = prompt_text(prompt)
    for index, record in enumerate(src.records()):
        if isinstance(record, SampleError):
            yield record
            continue
        if not isinstance(record, dict) or not isinstance(record.get("image_id"), str) or not record["image_id"]:
            yield bad(f"expected an object with a file name in 'image_id', got {record!r:.80}", src.path, index)
            continue
        image = record["image_id"]
        try:
            captions = caption_list(record.get("caption"))
        except TypeError as e:
            yield bad(str(e), src.path, index, image)
            continue
        yield from caption_samples(
            image, image, captions, user=user, caption_mode=caption_mode, seed=seed, system=system
        )
