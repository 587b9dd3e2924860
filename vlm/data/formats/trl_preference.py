"""TRL's preference format, as TRL's `DPOTrainer` reads it (JSON array, JSON Lines, or a table).

    {"prompt": "What color is the circle?", "chosen": "red", "rejected": "blue", "images": [...]}
    {"prompt": [{"role": "user", "content": "What color is the circle?"}],
     "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]}
    {"chosen": [<user>, <assistant "red">], "rejected": [<user>, <assistant "blue">]}   # implicit prompt

Mapping (what TRL sees, `trl.data_utils`): the prompt is `prompt` when it is conversational exactly when
`chosen` is (TRL's `maybe_extract_prompt`), else the longest common prefix of `chosen` and `rejected` (TRL's
`extract_prompt`: whole messages for conversations, characters for text, a space before the difference left
with the answers; our text answers and prompt are then stripped of surrounding whitespace). A text prompt is
one user message. Answers and message content as `vlm.data.formats.preference` maps them; images from
`images` (a list) or `image` (one), placed before the first user text when no message marks them (TRL's
`prepare_multimodal_messages`). The record's other scalar fields go into `meta`.
"""

from __future__ import annotations

from typing import Any, Iterator

from vlm.data.errors import SampleError
from vlm.data.formats.common import bad, extra_fields, image_list, record_id
from vlm.data.formats.preference import answer_text, conversation, preference_sample
from vlm.data.formats.source import SourceFile

NAME = "trl_preference"
_USED = ("id", "prompt", "chosen", "rejected", "images", "image")


def detect(src: SourceFile, **options: Any) -> bool:
    first = src.first
    return (src.kind in ("array", "lines", "table") and isinstance(first, dict) and "chosen" in first
            and "rejected" in first and "conversations" not in first and "question" not in first)


def read(src: SourceFile) -> Iterator[dict | SampleError]:
    for index, record in enumerate(src.records()):
        yield record if isinstance(record, SampleError) else trl_record(record, src, index)


def is_conversational(value: Any) -> bool:
    """TRL's test: a list whose first element is a dict with a `role`."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def split_prompt(record: dict) -> tuple[Any, Any, Any, bool]:
    """(prompt, chosen, rejected, implicit) as TRL's `maybe_extract_prompt` gives them."""
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record and is_conversational(record["prompt"]) == is_conversational(chosen):
        return record["prompt"], chosen, rejected, False
    if not isinstance(chosen, (str, list)) or type(chosen) is not type(rejected):
        raise TypeError("without a prompt, 'chosen' and 'rejected' must both be texts or both conversations")
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):  # TRL's extract_prompt, step for step
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # the space before the difference stays with the answers
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:], True


def trl_record(record: Any, src: SourceFile, index: int) -> dict | SampleError:
    if not isinstance(record, dict):
        return bad(f"expected an object, got {type(record).__name__}", src.path, index)
    sample_id = record_id(record.get("id"), src.path, index)
    missing = [k for k in ("chosen", "rejected") if record.get(k) is None]
    if missing:
        return bad(f"no {' or '.join(repr(k) for k in missing)} (the record's keys: {sorted(map(str, record))[:10]})",
                   src.path, index, sample_id)
    try:
        images = image_list(record["images"] if "images" in record else record.get("image"))
        prompt, chosen, rejected, implicit = split_prompt(record)
        if isinstance(prompt, str):
            strip = str.strip if implicit else (lambda text: text)
            messages = [{"role": "user", "content": strip(prompt)}]
            chosen, rejected = strip(answer_text(chosen, "chosen")), strip(answer_text(rejected, "rejected"))
        else:
            messages = conversation(prompt)
            chosen, rejected = answer_text(chosen, "chosen"), answer_text(rejected, "rejected")
    except TypeError as e:
        return bad(str(e), src.path, index, sample_id)
    return preference_sample(sample_id, images, messages, chosen, rejected, extra_fields(record, _USED))
