"""LLaVA conversation files (JSON array or JSON Lines), read and written.

Record: `{"id"?, "image"?: str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value": str}]}`
(LLaVA's `llava_v1_5_mix665k.json`, ShareGPT-style sets). Also accepted: roles `user`/`assistant`
and turns written `{"role", "content"}`. A record without `image` is a text-only sample. An unknown
role is `bad_roles`; any other shape problem is `bad_schema`.

`to_llava` is the inverse used by `vlm data convert`: one image -> a string, several -> a list,
none -> no `image` key; roles written `human`/`gpt`/`system`; `meta` fields back at the top level.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from vlm.data.errors import DataError, SampleError
from vlm.data.formats.common import bad, extra_fields, image_list, make_sample, record_id
from vlm.data.formats.source import SourceFile

NAME = "llava"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_WRITE_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def detect(src: SourceFile, **options: Any) -> bool:
    first = src.first
    return (src.kind in ("array", "lines", "table") and isinstance(first, dict) and "conversations" in first
            and not ("chosen" in first and "rejected" in first))  # a preference record: llava_preference


def read(src: SourceFile) -> Iterator[dict | SampleError]:
    for index, record in enumerate(src.records()):
        yield record if isinstance(record, SampleError) else conversation_record(record, src, index)


def conversation_record(
    record: Any,
    src: SourceFile,
    index: int,
    keys: tuple[str, ...] = ("conversations",),
    add_turn: Callable[[Any, list[dict]], str | None] | None = None,
) -> dict | SampleError:
    """A record with `id`, `image` and a list of turns under the first of `keys` it has -> canonical sample.

    `add_turn(turn, messages)` appends a turn's messages or returns what is wrong with it (default:
    one LLaVA turn). Shared with the xtuner reader.
    """
    add_turn = add_turn or append_turn
    if not isinstance(record, dict):
        return bad(f"expected an object, got {type(record).__name__}", src.path, index)
    sample_id = record_id(record.get("id"), src.path, index)
    key = next((k for k in keys if k in record), keys[0])
    turns = record.get(key)
    if key not in record:
        return bad(f"no '{key}' list (the record's keys: {sorted(map(str, record))[:10]})", src.path, index, sample_id)
    if not isinstance(turns, list) or not turns:
        return bad(f"'{key}' must be a non-empty list", src.path, index, sample_id)
    try:
        images = image_list(record.get("image"))
    except TypeError as e:
        return bad(str(e), src.path, index, sample_id)
    messages: list[dict] = []
    for k, turn in enumerate(turns):
        problem = add_turn(turn, messages)
        if problem:
            reason = "bad_roles" if problem.startswith("unknown role") else "bad_schema"
            return bad(f"turn {k}: {problem}", src.path, index, sample_id, reason)
    return make_sample(sample_id, images, messages, extra_fields(record, ("id", "image", key)))


def append_turn(turn: Any, messages: list[dict]) -> str | None:
    """Append one `{"from", "value"}` / `{"role", "content"}` turn; return what is wrong with it, or None."""
    message = turn_message(turn)
    if isinstance(message, str):
        return message
    messages.append(message)
    return None


def turn_message(turn: Any) -> dict | str:
    """`{"from", "value"}` or `{"role", "content"}` -> canonical message, or a string saying what is wrong."""
    try:  # fast path, the usual LLaVA turn (this runs ~5 times per record when indexing 665K records)
        content = turn["value"]
        if type(content) is str:
            return {"role": ROLES[turn["from"]], "content": content}
    except (KeyError, TypeError):
        pass
    if not isinstance(turn, dict):
        return f"expected an object, got {type(turn).__name__}"
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if not isinstance(role, str):
        return "missing 'from' (or 'role')"
    if not isinstance(content, str):
        return f"'value' must be a string, got {type(content).__name__}"
    if role.lower() not in ROLES:
        return f"unknown role {role!r}; expected one of {sorted(ROLES)}"
    return {"role": ROLES[role.lower()], "content": content}


def to_llava(sample: dict) -> dict:
    """Canonical sample -> LLaVA record (the output format of `vlm data convert`); a preference sample keeps its
    `chosen` and `rejected` (LLaVA-style preference, read back by `llava_preference`). DataError for an image
    embedded in a table: LLaVA JSON holds file paths."""
    record: dict[str, Any] = {"id": sample["id"]}
    images = sample.get("images") or []
    if any(isinstance(image, dict) for image in images):
        raise DataError(f"sample {sample['id']!r} has images embedded in a table, and LLaVA JSON holds file paths; "
                        "train from the table itself (--data_path x.parquet) instead of converting it")
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["image"] = list(images)
    record["conversations"] = [{"from": _WRITE_ROLES[m["role"]], "value": m["content"]} for m in sample["messages"]]
    for key in ("chosen", "rejected"):
        if key in sample:
            record[key] = sample[key]
    for key, value in (sample.get("meta") or {}).items():
        record.setdefault(key, value)
    return record
