"""A multi-turn conversation about images: the messages so far, their images, an image for the next question.

The whole history is sent every turn (`Generator.reply`). `vlm chat` (`vlm.cli.chat`) is the terminal around it.
"""

from __future__ import annotations

from typing import IO, Any

from vlm.data.tokenizer import IMAGE_TOKEN
from vlm.processing import as_image


class ChatSession:
    """Conversation state: the messages so far, their images, and an image waiting for the next question."""

    def __init__(self, generator, image: Any = None):
        self.generator = generator
        self.messages: list[dict] = []
        self.images: list[Any] = []
        self.current_image = None
        self.pending_image = None
        if image is not None:
            self.set_image(image)

    def set_image(self, source: Any) -> None:
        """Load an image (as `vlm.processing.as_image` takes it) now, so a bad file is reported at once; it goes
        with the next question."""
        self.current_image = self.pending_image = as_image(source)

    def reset(self) -> None:
        self.messages, self.images = [], []
        self.pending_image = self.current_image

    def ask(self, text: str, *, stream: IO[str] | None = None) -> str:
        """Answer `text` in the context of the history; on error the history is left unchanged."""
        images = list(self.images)
        content = text
        if self.pending_image is not None:
            content = f"{IMAGE_TOKEN}\n{text}"
            images.append(self.pending_image)
        messages = self.messages + [{"role": "user", "content": content}]
        answer = self.generator.reply(messages, images, stream=stream)
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.images = images
        self.pending_image = None
        return answer
