"""OpenAI's chat-completions protocol: the request validated once, the response objects, the error object.

References: https://platform.openai.com/docs/api-reference/chat/create (request, `chat.completion`,
`chat.completion.chunk`), https://platform.openai.com/docs/guides/error-codes (the error object
`{"error": {"message", "type", "param", "code"}}`). The tests drive the server with the official `openai` client.

Design choices:
- `content` is a string or a list of parts, `{"type": "text", "text": ...}` and
  `{"type": "image_url", "image_url": {"url": ...}}`. Parts are joined with newlines and an image part becomes
  the `<image>` placeholder at its place, so `[image, text]` is `"<image>\\n" + text`, the prompt `vlm generate`
  builds for one question about one image: the answers are the same.
- `developer` is OpenAI's newer name for `system`. Images only in user messages.
- A parameter vlm cannot honour (`n` > 1, `logprobs`, `tools`, penalties, `seed`, ...) is a 400 naming it, not
  silently ignored; unknown keys (`user`, `metadata`, `store`) are ignored, as OpenAI's server does.
- A request without `temperature` / `max_tokens` gets the server's defaults (`vlm serve --temperature
  --max_new_tokens`; greedy unless told), not OpenAI's temperature 1.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlm.data.tokenizer import IMAGE_TOKEN
from vlm.errors import UserError

MAX_STOP_STRINGS = 4  # OpenAI's limit


class RequestError(UserError):
    """A request the server refuses: HTTP `status` with OpenAI's error object naming `param` and `code`."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------
# The request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None  # OpenAI's resolution hint; the image processor decides the size here


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part]]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None


# parameter -> the values vlm honours (absent, null or these); any other value is a 400 naming the parameter
UNSUPPORTED: dict[str, tuple] = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "seed": (),
    "audio": (), "modalities": (["text"],), "prediction": (),
}


@dataclass
class ParsedRequest:
    """A validated request: the conversation (contents with `<image>` placeholders), its image URLs in order,
    and the decoding options it names (None: the server's default)."""

    model: str
    messages: list[dict]
    image_urls: list[tuple[str, str]]  # (url, the request parameter it came from)
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_request(body: Any) -> ParsedRequest:
    """The JSON body of `POST /v1/chat/completions` -> `ParsedRequest`; `RequestError` (400) naming the
    parameter otherwise."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == a for a in allowed):
            raise RequestError(f"parameter {name}={value!r} is not supported by vlm serve; leave it out",
                               param=name, code="unsupported_parameter")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "tagged-union")))
        raise RequestError(f"invalid request: {where or 'body'}: {first['msg']}", param=where or None,
                           code="invalid_value") from None
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise RequestError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings, got {list(stop)!r}", param="stop",
                           code="invalid_value")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise RequestError(f"max_tokens={request.max_tokens} and max_completion_tokens="
                           f"{request.max_completion_tokens} disagree; give one of them", param="max_tokens")
    messages, image_urls = to_conversation(request.messages)
    return ParsedRequest(
        model=request.model, messages=messages, image_urls=image_urls,
        max_tokens=request.max_completion_tokens or request.max_tokens, temperature=request.temperature,
        top_p=request.top_p, stop=stop, stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


def to_conversation(messages: list[Message]) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages -> vlm's conversation (`{"role", "content"}` with `<image>` where each image goes) and the
    image URLs in the order of their placeholders. Role order and placeholder counts are checked later, by the
    prompt builder (`vlm.processing.build_prompt`), the same checks every prompt gets."""
    conversation, urls = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            pieces = [message.content]
        else:
            pieces = []
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    pieces.append(part.text)
                    continue
                param = f"messages.{i}.content.{j}.image_url"
                if role != "user":
                    raise RequestError(f"messages[{i}] ({message.role}) has an image; images go in user messages",
                                       param=param, code="invalid_value")
                pieces.append(IMAGE_TOKEN)
                urls.append((part.image_url.url, param))
        conversation.append({"role": role, "content": "\n".join(pieces)})
    return conversation, urls


# ---------------------------------------------------------------------------------------------------------
# The responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """A `chat.completion` object with one choice."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, *, created: int) -> dict:
    """A `chat.completion.chunk` with one choice (`delta`: the role first, then pieces of content)."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(cid: str, model: str, prompt_tokens: int, completion_tokens: int, *, created: int) -> dict:
    """The last chunk when `stream_options.include_usage`: no choices, the usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


# ---------------------------------------------------------------------------------------------------------
# Stop strings


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first occurrence of any stop string (which is not included), and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class TextStream:
    """The streamed answer: pieces of decoded text in, deltas out, such that the deltas join to the same text as
    the non-streamed answer (leading and trailing whitespace stripped, cut before a stop string).

    Trailing whitespace, and a tail that could be the start of a stop string, are held back until the next
    piece shows what they are."""

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.raw = ""
        self.sent = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The delta to send after `piece`; `stopped` is set when a stop string appeared."""
        if self.stopped:
            return ""
        self.raw += piece
        text = self.raw.lstrip()
        cut, self.stopped = cut_at_stop(text, self.stop)
        if not self.stopped:
            cut = cut.rstrip()
            hold = max((k for s in self.stop for k in range(1, len(s)) if cut.endswith(s[:k])), default=0)
            cut = cut[:len(cut) - hold]
        return self._advance(cut)

    def finish(self, final_text: str) -> str:
        """The rest of `final_text` (the non-streamed answer) not sent yet."""
        return self._advance(final_text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
