"""The one validator of the canonical sample (DESIGN.md): structure, role order, empty turns.

    {"id": str, "images": [relative paths], "messages": [{"role": "system"|"user"|"assistant", "content": str}]}

plus an optional `"meta": {field: scalar}` that readers fill with the record's other fields.

A **preference sample** is the same with `"chosen": str` and `"rejected": str` added; its `messages` are
the prompt and end with a user turn (only a preference sample may end so). An entry of `images` is a
relative path, or an **embedded image** (an image stored inside a table, as the `datasets` Image feature
stores it), a dict in one of two forms:
- `{"bytes": <the encoded image file>, "path": str | None}`: in memory (samples built in Python); with
  `"bytes": None` the image is the file `path` under the image folder (as `datasets` stores a file it did
  not embed);
- `{"table": <data file>, "row": int, "column": str, "item"?: int, "path": str | None}`: a reference to
  a cell of a Parquet / Arrow table (`item`: the position in a list-of-images cell), what the table
  readers produce; the bytes are read from the memory-mapped file when the sample is used
  (`vlm.data.embedded`), so a stored sample stays a few dozen bytes whatever the image's size.

`vlm data check` and training (`vlm.data.check.check_sample`, which `SupervisedDataset` calls too) and
the tokeniser (`vlm.data.conversation.encode_sample` / `encode_prompt`) all validate with the functions
below, so a bad sample gets the same reason everywhere. Rules, checked in this order, the first failure
raised as a `SampleError`:
- `bad_schema`: not this structure (wrong types, missing keys, no messages, an image path with a
  NUL character);
- `bad_roles`: an unknown role; a system message anywhere but first; user and assistant not
  alternating starting with user (`[user, user]`, an assistant first);
- `no_supervised_tokens`: the roles alternate but there is no assistant message at all;
- `bad_roles`: a conversation that does not end with an assistant reply (the trailing question would
  be trained on nothing); for a generation prompt, one that does not end with a user message;
- `empty_turn`: a message whose content is empty or only whitespace;
- preference samples: `bad_schema` when `chosen`/`rejected` are not both strings; the prompt checked as a
  generation prompt (`bad_roles` unless it ends with a user turn); `empty_answer` when one answer is empty
  or only whitespace; `same_answers` when the two are equal after stripping whitespace (no preference).
Placeholder counts and token lengths need a tokenizer and are checked by
`vlm.data.conversation.encode_sample`; image files by `vlm.data.paths`.
"""

from __future__ import annotations

from typing import Any

from vlm.data.errors import SampleError

ROLES = ("system", "user", "assistant")
_KEYS = {"id", "images", "messages", "meta", "chosen", "rejected"}
PREFERENCE_KEYS = ("chosen", "rejected")
_EMBEDDED_KEYS = {"bytes", "path", "table", "row", "column", "item"}


def validate_sample(sample: Any, *, index: int | None = None) -> dict:
    """Return `sample` unchanged when it is a valid canonical sample; raise `SampleError` otherwise."""
    sample_id = sample.get("id") if isinstance(sample, dict) and isinstance(sample.get("id"), str) else None
    problem = _schema_problem(sample)
    if problem:
        raise SampleError("bad_schema", problem, index=index, sample_id=sample_id)
    if not is_preference(sample):
        validate_messages(sample["messages"], index=index, sample_id=sample_id)
        return sample
    validate_messages(sample["messages"], for_generation=True, index=index, sample_id=sample_id)
    for key in PREFERENCE_KEYS:
        if not sample[key].strip():
            raise SampleError("empty_answer", f"the {key} answer is empty", index=index, sample_id=sample_id)
    if sample["chosen"].strip() == sample["rejected"].strip():
        raise SampleError("same_answers", f"chosen and rejected are the same answer ({sample['chosen'].strip()!r:.80}): "
                          "the pair prefers nothing", index=index, sample_id=sample_id)
    return sample


def is_preference(sample: dict) -> bool:
    """Whether `sample` is a preference sample (has `chosen` or `rejected`; `validate_sample` wants both)."""
    return "chosen" in sample or "rejected" in sample


def is_embedded(image: Any) -> bool:
    """Whether an `images` entry is an embedded image (a dict, module docstring) rather than a path."""
    return isinstance(image, dict)


def validate_messages(messages: Any, *, for_generation: bool = False, index: int | None = None,
                      sample_id: str | None = None) -> list[dict]:
    """Check a conversation's messages (module docstring rules); return `{"role", "content"}` copies.

    `for_generation`: a prompt, which must end with a user message instead of an assistant reply."""

    def fail(reason: str, detail: str) -> SampleError:
        return SampleError(reason, detail, index=index, sample_id=sample_id)

    if not isinstance(messages, list) or not messages:
        raise fail("bad_schema", "'messages' must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise fail("bad_schema", f"message {k} must be {{'role': str, 'content': str}}, got {m!r:.100}")
    roles = [m["role"] for m in messages]
    problem = _role_problem(roles)
    if problem:
        raise fail("bad_roles", f"{problem} (roles: {', '.join(roles)})")
    turns = roles[1:] if roles[0] == "system" else roles
    if for_generation:
        if not turns or turns[-1] != "user":
            raise fail("bad_roles", f"a generation prompt must end with a user message (roles: {', '.join(roles)})")
    elif "assistant" not in turns:
        raise fail("no_supervised_tokens", f"the conversation has no assistant turn (roles: {', '.join(roles)})")
    elif turns[-1] != "assistant":
        raise fail("bad_roles", "the conversation ends with an unanswered user message; drop it or add the reply "
                                f"(roles: {', '.join(roles)})")
    for k, message in enumerate(messages):
        if not message["content"].strip():
            raise fail("empty_turn", f"message {k} ({message['role']}) is empty")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _schema_problem(sample: Any) -> str | None:
    if not isinstance(sample, dict):
        return f"a sample must be an object, got {type(sample).__name__}"
    missing = sorted({"id", "images", "messages"} - set(sample))
    if missing:
        return f"missing key(s) {missing}"
    unknown = sorted(set(sample) - _KEYS)
    if unknown:
        return f"unknown key(s) {unknown}; a canonical sample has {sorted(_KEYS)}"
    if not isinstance(sample["id"], str) or not sample["id"]:
        return f"'id' must be a non-empty string, got {sample['id']!r}"
    images = sample["images"]
    if not isinstance(images, list):
        return f"'images' must be a list of relative paths or embedded images, got {images!r:.100}"
    for image in images:
        problem = _embedded_problem(image) if is_embedded(image) else _path_problem(image)
        if problem:
            return problem
    if "meta" in sample and not isinstance(sample["meta"], dict):
        return f"'meta' must be an object, got {type(sample['meta']).__name__}"
    if is_preference(sample):
        for key in PREFERENCE_KEYS:
            if not isinstance(sample.get(key), str):
                return f"a preference sample needs '{key}' as a string, got {sample.get(key)!r:.80}"
    return None


def _path_problem(image: Any) -> str | None:
    if not isinstance(image, str) or not image:
        return f"an 'images' entry must be a relative path or an embedded image, got {image!r:.100}"
    if "\x00" in image:  # no file system takes it; os calls would raise for the whole run
        return f"an image path holds a NUL character: {image!r:.100}"
    return None


def _embedded_problem(image: dict) -> str | None:
    """What is wrong with an embedded image entry (module docstring), or None."""
    unknown = sorted(set(image) - _EMBEDDED_KEYS)
    path = image.get("path")
    if unknown or not (path is None or isinstance(path, str)):
        return (f"an embedded image is {{'bytes', 'path'}} or {{'table', 'row', 'column', 'item'?, 'path'}}, "
                f"got keys {sorted(image)}")
    if "bytes" in image:
        data = image["bytes"]
        if {"table", "row", "column", "item"} & set(image) or not (
                isinstance(data, (bytes, bytearray, memoryview)) or (data is None and path)):
            return (f"an embedded image's 'bytes' must be the image file's bytes (or None with a 'path'), and no table "
                    f"reference, got {image!r:.100}")
        return None
    table, row, column, item = image.get("table"), image.get("row"), image.get("column"), image.get("item", 0)
    if not (isinstance(table, str) and table and "\x00" not in table and isinstance(column, str)
            and _count(row) and _count(item)):
        return f"an embedded image reference needs 'table' (str), 'row' (int >= 0) and 'column' (str), got {image!r:.100}"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _role_problem(roles: list[str]) -> str | None:
    """Unknown roles, a misplaced system message, or user/assistant not alternating from user (None: fine)."""
    unknown = sorted({r for r in roles if r not in ROLES})
    if unknown:
        return f"unknown role(s) {unknown}; expected {ROLES}"
    turns = roles[1:] if roles[0] == "system" else roles
    if "system" in turns:
        return "a system message may only come first"
    for k, role in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            return f"turn {k} is {role!r}, expected {expected!r} (user and assistant must alternate, user first)"
    return None


def with_context(error: SampleError, *, index: int | None, sample_id: str | None, where: str = "") -> SampleError:
    """A copy of `error` that names the sample's position, id and (in `where`) its file."""
    detail = f"{error.detail} ({where})" if where else error.detail
    return SampleError(error.reason, detail, index=index, sample_id=sample_id if sample_id is not None else error.sample_id)
