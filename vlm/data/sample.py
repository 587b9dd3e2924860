"""Validation of the canonical sample (DESIGN.md): structure, role order, empty turns.

    {"id": str, "images": [relative paths], "messages": [{"role": "system"|"user"|"assistant", "content": str}]}

plus an optional `"meta": {field: scalar}` that readers fill with the record's other fields.

Rules, checked in this order, the first failure raised as a `SampleError`:
- `bad_schema`: not this structure (wrong types, missing keys, no messages, an image path with a
  NUL character);
- `bad_roles`: an unknown role; a system message anywhere but first; user and assistant not
  alternating starting with user; a conversation that does not end with an assistant reply (the
  trailing question would be trained on nothing);
- `no_supervised_tokens`: no assistant message at all (as `encode_sample` says it);
- `empty_turn`: a message whose content is empty or only whitespace.
Placeholder counts and token lengths need a tokenizer and are checked by
`vlm.data.conversation.encode_sample`; image files by `vlm.data.paths`.
"""

from __future__ import annotations

from typing import Any

from vlm.data.errors import SampleError

ROLES = ("system", "user", "assistant")
_KEYS = {"id", "images", "messages", "meta"}


def validate_sample(sample: Any, *, index: int | None = None) -> dict:
    """Return `sample` unchanged when it is a valid canonical sample; raise `SampleError` otherwise."""
    sample_id = sample.get("id") if isinstance(sample, dict) and isinstance(sample.get("id"), str) else None

    def fail(reason: str, detail: str) -> SampleError:
        return SampleError(reason, detail, index=index, sample_id=sample_id)

    problem = _schema_problem(sample)
    if problem:
        raise fail("bad_schema", problem)
    roles = [m["role"] for m in sample["messages"]]
    if all(r in ROLES for r in roles) and "assistant" not in roles:
        raise fail("no_supervised_tokens", f"the conversation has no assistant turn (roles: {', '.join(roles)})")
    problem = _role_problem(roles)
    if problem:
        raise fail("bad_roles", f"{problem} (roles: {', '.join(roles)})")
    for k, message in enumerate(sample["messages"]):
        if not message["content"].strip():
            raise fail("empty_turn", f"message {k} ({message['role']}) is empty")
    return sample


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
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return f"'images' must be a list of relative paths, got {images!r:.100}"
    if any("\x00" in p for p in images):  # no file system takes it; os calls would raise for the whole run
        return f"an image path holds a NUL character: {next(p for p in images if chr(0) in p)!r:.100}"
    messages = sample["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {k} must be {{'role': str, 'content': str}}, got {m!r:.100}"
    if "meta" in sample and not isinstance(sample["meta"], dict):
        return f"'meta' must be an object, got {type(sample['meta']).__name__}"
    return None


def _role_problem(roles: list[str]) -> str | None:
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
    if turns[-1] != "assistant":
        return "the conversation must end with an assistant reply"
    return None


def with_context(error: SampleError, *, index: int | None, sample_id: str | None, where: str = "") -> SampleError:
    """A copy of `error` that names the sample's position, id and (in `where`) its file."""
    detail = f"{error.detail} ({where})" if where else error.detail
    return SampleError(error.reason, detail, index=index, sample_id=sample_id if sample_id is not None else error.sample_id)
