"""LLaVA-style preference records: a LLaVA conversation up to the last user turn, then the two replies.

    {"id": "1", "image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\\nHow many?"}],
     "chosen": "Two.", "rejected": "Three."}

`conversations` and `image` are read as the `llava` reader reads them (roles `human`/`gpt`/`system` or
`user`/`assistant`, one image or a list, a table's embedded image); the conversation is the prompt and must
end with a user turn (validation says `bad_roles` otherwise). `chosen`/`rejected`: the replies, as text (or
a one-message assistant list, `vlm.data.formats.preference`). Other scalar fields go into `meta`
(`vlm data synth --preference` writes this format).
"""

from __future__ import annotations

from typing import Any, Iterator

from vlm.data.errors import SampleError
from vlm.data.formats.common import bad
from vlm.data.formats.llava import conversation_record
from vlm.data.formats.preference import answer_text, preference_sample
from vlm.data.formats.source import SourceFile

NAME = "llava_preference"


def detect(src: SourceFile, **options: Any) -> bool:
    first = src.first
    return (src.kind in ("array", "lines", "table") and isinstance(first, dict) and "conversations" in first
            and "chosen" in first and "rejected" in first)


def read(src: SourceFile) -> Iterator[dict | SampleError]:
    for index, record in enumerate(src.records()):
        yield record if isinstance(record, SampleError) else llava_preference_record(record, src, index)


def llava_preference_record(record: Any, src: SourceFile, index: int) -> dict | SampleError:
    sample = conversation_record(record, src, index)
    if isinstance(sample, SampleError):
        return sample
    meta = {k: v for k, v in (sample.get("meta") or {}).items() if k not in ("chosen", "rejected")}
    try:
        chosen, rejected = (answer_text(record.get(k), k) for k in ("chosen", "rejected"))
    except TypeError as e:
        return bad(str(e), src.path, index, sample["id"])
    return preference_sample(sample["id"], sample["images"], sample["messages"], chosen, rejected, meta)
