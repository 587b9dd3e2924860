"""xtuner conversation files (JSON array or JSON Lines).

Two record styles:
- xtuner's own: `{"image"?, "conversation": [{"system"?: str, "input": str, "output": str}, ...]}`;
  each turn gives an optional system message (an empty one is left out), a user and an assistant
  message.
- role/content: `{"image"?, "conversation" | "messages": [{"role", "content"}, ...]}` (the OpenAI
  style xtuner also reads); LLaVA's `from`/`value` spelling is accepted inside it too.
"""

from __future__ import annotations

from typing import Any, Iterator

from vlm.data.errors import SampleError
from vlm.data.formats.llava import append_turn, conversation_record
from vlm.data.formats.source import SourceFile

NAME = "xtuner"
_KEYS = ("conversation", "messages")


def detect(src: SourceFile, **options: Any) -> bool:
    first = src.first
    return src.kind in ("array", "lines") and isinstance(first, dict) and any(k in first for k in _KEYS)


def read(src: SourceFile) -> Iterator[dict | SampleError]:
    for index, record in enumerate(src.records()):
        yield record if isinstance(record, SampleError) else conversation_record(record, src, index, _KEYS, _add_turn)


def _add_turn(turn: Any, messages: list[dict]) -> str | None:
    if isinstance(turn, dict) and ("input" in turn or "output" in turn):
        return _io_turn(turn, messages)
    return append_turn(turn, messages)


def _io_turn(turn: dict, messages: list[dict]) -> str | None:
    """Append the messages of one `{"system"?, "input", "output"}` turn; return a problem or None."""
    for field in ("system", "input", "output"):
        if field in turn and not isinstance(turn[field], str):
            return f"'{field}' must be a string, got {type(turn[field]).__name__}"
    if "input" not in turn or "output" not in turn:
        return "a turn needs both 'input' and 'output'"
    if turn.get("system"):
        messages.append({"role": "system", "content": turn["system"]})
    messages.append({"role": "user", "content": turn["input"]})
    messages.append({"role": "assistant", "content": turn["output"]})
    return None
