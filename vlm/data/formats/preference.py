"""What the preference readers share: message content in TRL's shapes -> our text, and the preference sample.

A preference sample (DESIGN.md, `vlm.data.sample`) is a canonical sample whose `messages` are the prompt,
ending with a user turn, plus `"chosen": str` and `"rejected": str`. The readers (`trl_preference`,
`llava_preference`, `rlaif_v`) build it here, so the three map images and answers the same way.

Design choices:
- Content given as a list of parts (TRL's / transformers' multimodal messages, `[{"type": "image"},
  {"type": "text", "text": ...}]`) becomes one string: each image part `<image>`, each text part its text,
  joined by newlines (`<image>\\nWhat is shown?`, LLaVA's convention and what llava-hf's chat template
  renders for an image followed by text).
- Images are placed as TRL's `prepare_multimodal_messages` places them when no message marks them: all of
  them before the text of the first user message (`<image>\\n` each). A prompt that already holds `<image>`
  marks (or image parts) keeps them where they are; a count that disagrees with the images is left for
  validation to report (`placeholder_mismatch`).
- An answer is text, or (conversational) a list of exactly one assistant message; several messages (a
  multi-turn completion) are `bad_schema`: a pair compares one reply.
"""

from __future__ import annotations

from typing import Any

from vlm.data.formats.common import IMAGE, make_sample

_PART_TEXT = {"text": "text"}  # part type -> the key holding its text


def content_text(content: Any) -> str:
    """A message's content (a string, or a list of `{"type": "image"|"text", ...}` parts) as our text;
    TypeError when it is neither."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise TypeError(f"a content part must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}, got "
                            f"{part!r:.80}")
    return "\n".join(pieces)


def conversation(messages: Any) -> list[dict]:
    """TRL-style messages (`{"role", "content"}`, content as `content_text` takes it) -> canonical messages;
    TypeError when they are not a non-empty list of such messages."""
    if not isinstance(messages, list) or not messages:
        raise TypeError(f"expected a non-empty list of messages, got {messages!r:.80}")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TypeError(f"message {k} must be {{'role': str, 'content': ...}}, got {message!r:.80}")
        try:
            out.append({"role": message["role"], "content": content_text(message.get("content"))})
        except TypeError as e:
            raise TypeError(f"message {k}: {e}") from None
    return out


def answer_text(value: Any, key: str) -> str:
    """`chosen`/`rejected` as text, or a one-message assistant list -> its text; TypeError otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = conversation(value)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            raise TypeError(f"'{key}' must be one assistant message, got roles {roles} (a pair compares one reply)")
        return messages[0]["content"]
    raise TypeError(f"'{key}' must be a string or a one-message assistant list, got {value!r:.80}")


def place_images(messages: list[dict], num_images: int) -> list[dict]:
    """Put `num_images` `<image>` marks before the text of the first user message when no message has one
    (TRL's placement, module docstring); otherwise return `messages` unchanged."""
    if not num_images or any(IMAGE in m["content"] for m in messages):
        return messages
    out = [dict(m) for m in messages]
    first_user = next((m for m in out if m["role"] == "user"), None)
    if first_user is not None:
        first_user["content"] = f"{IMAGE}\n" * num_images + first_user["content"]
    return out


def preference_sample(sample_id: str, images: list, prompt: list[dict], chosen: str, rejected: str,
                      meta: dict | None = None) -> dict:
    """The canonical preference sample (validation happens later, with the reasons of `vlm.data.sample`)."""
    sample = make_sample(sample_id, images, place_images(prompt, len(images)), meta)
    sample["chosen"] = chosen
    sample["rejected"] = rejected
    return sample
