"""The one decode loop: prompt ids and images -> answers, greedy or sampled, with the KV cache, in batches.

Every answer vlm gives goes through `decode_prompts`: `vlm.answer`, `test.py` / `vlm ask`, `vlm chat`,
`vlm generate` and `vlm eval`.

Design choices:
- Decoding is `transformers`' `generate` with a fresh `GenerationConfig` (the LLM's own generation
  defaults, e.g. a checkpoint's `do_sample=True`, never leak in): temperature 0 is greedy; generation
  stops at the template's end-of-turn token or eos. Images are encoded once, at prefill.
- Batches are left-padded (the last prompt token of every row sits at the same position, so one
  `generate` call decodes all rows); rows are sorted by length to waste little padding and answers are
  returned in input order. Greedy batched answers equal one-at-a-time answers in float32 (tests); in bfloat16 the
  rounding depends on the batch's shape and they can part (7 of 16 equal on an H100, bench/RESULTS.md).
- Batching amortises the decode steps only: the vision tower and the prefill cost the same per prompt in a batch
  (compute-bound), which caps the speed-up (bench/generate_profile.py: at most 4.06x on the 42m model with 32 new
  tokens on one CPU thread, 2.3x measured at batch 8).
- `max_new_tokens` is capped so prompt + answer fit the context.
- Streaming is per row: `generate_ids(..., streams=[RowText or None per row])` hands each row's new tokens to
  its own `RowText` (transformers' `TextStreamer` rule for when text is final), until the row's stop token, so
  streamed rows batch like the others (`vlm serve`). A row's callback that raises `StopGeneration` ends that
  row only (a stopping criterion marks it finished; `generate` pads it from then on) and the others go on.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import IO, Any, Callable, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation.streamers import BaseStreamer

from vlm.errors import ConfigError, UserError
from vlm.processing import left_pad, load_pixels

# What one question (a chat line, a line of a questions file) can get wrong without stopping the others: a
# `UserError` (too long, a bad image, a template that cannot render it); plain ValueError/FileNotFoundError
# as raised by library code that does not use vlm.errors yet.
LINE_ERRORS = (UserError, ValueError, FileNotFoundError)


@dataclass
class GenerationSettings:
    """Decoding options: temperature 0 is greedy; top_p applies when sampling."""

    temperature: float = 0.0
    top_p: float | None = None
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # also nan, which compares false both ways
            raise ConfigError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


class StopGeneration(Exception):
    """Raised by a row's stream callback to end that row's decoding early (a stop string appeared, the client left)."""


class RowText(TextStreamer):
    """One row's answer as it is generated: each piece of text that is final (TextStreamer's rule: up to a space,
    a newline or a CJK character) goes to `on_text`, the rest when the row ends. Fed by `RowStreams`."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.on_text = on_text
        self.tokens = 0  # tokens this row generated, its end-of-turn token included
        self.stopped = False  # ended by `on_text` raising StopGeneration

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text and self.on_text is not None:
            self.on_text(text)


class StreamToFile(RowText):
    """Writes the decoded answer to `file` as tokens arrive, then a newline."""

    def __init__(self, tokenizer, file: IO[str] | None = None):
        super().__init__(tokenizer)
        self.file = file if file is not None else sys.stdout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.file.write(text + ("\n" if stream_end else ""))
        self.file.flush()


class RowStreams(BaseStreamer, StoppingCriteria):
    """The streamer and stopping criterion `generate` gets for one batch: row i's new tokens go to `rows[i]` (None:
    a row nobody streams) until its stop token; rows whose callback raised StopGeneration are reported finished."""

    def __init__(self, rows: Sequence[RowText | None], stop_ids: Sequence[int]):
        self.rows = list(rows)
        self.stop_ids = set(stop_ids)
        self.live = [row is not None for row in self.rows]
        self.prompt = True  # generate's first put is the prompt ids (B, T)

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        tokens = value.reshape(-1).tolist()  # (B,) one new token per row
        assert len(tokens) == len(self.rows), f"{len(tokens)} new tokens for a batch of {len(self.rows)}"
        for i, token in enumerate(tokens):
            if not self.live[i]:
                continue
            row = self.rows[i]
            row.tokens += 1
            if token in self.stop_ids:
                self._finish(i)
            else:
                self._feed(i, lambda: row.put(torch.tensor([token])))

    def end(self) -> None:
        for i, live in enumerate(self.live):
            if live:
                self._finish(i)

    def _finish(self, i: int) -> None:
        self._feed(i, self.rows[i].end)
        self.live[i] = False

    def _feed(self, i: int, step: Callable[[], None]) -> None:
        try:
            step()
        except StopGeneration:
            self.rows[i].stopped, self.live[i] = True, False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([row is not None and row.stopped for row in self.rows], device=input_ids.device)


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor | None, *, stop_ids: list[int],
                 pad_token_id: int, settings: GenerationSettings, context_len: int | None = None,
                 streams: Sequence[RowText | None] | None = None, use_cache: bool = True) -> list[list[int]]:
    """Generate for one left-padded batch; returns each row's new ids, cut before the first stop id.

    `pixel_values` (N, 3, H, W) holds the images of all prompts in order (the image runs in the ids).
    `streams`: one `RowText` (or None) per row, fed the row's text as it is generated; a row whose callback
    raised StopGeneration returns the ids generated until then (`RowText.tokens` of them).
    """
    ids, mask = left_pad(prompts, pad_token_id)  # (B, T), (B, T)
    max_new = settings.max_new_tokens
    if context_len is not None:
        max_new = max(1, min(max_new, context_len - ids.shape[1]))
    sampling = settings.temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new, do_sample=sampling, eos_token_id=list(stop_ids) or None, pad_token_id=pad_token_id,
        use_cache=use_cache, **({"temperature": settings.temperature, "top_p": settings.top_p or 1.0} if sampling else {}),
    )
    device = model.get_input_embeddings().weight.device
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    if streams is not None and len(streams) != len(prompts):
        raise UserError(f"{len(streams)} streams for {len(prompts)} prompts; pass one (or None) per prompt")
    watch = RowStreams(streams, stop_ids) if streams is not None else None
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixel_values,
                         generation_config=config, streamer=watch,
                         stopping_criteria=StoppingCriteriaList([watch] if watch is not None else []))
    answers = []
    for i, row in enumerate(out[:, ids.shape[1]:].tolist()):
        if streams is not None and streams[i] is not None and streams[i].stopped:
            row = row[:streams[i].tokens]  # what its stream saw; generate went on one step before noticing
        cut = next((k for k, token in enumerate(row) if token in stop_ids), len(row))
        answers.append(row[:cut])
    return answers


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def decode_prompts(model, tokenizer, image_processor, prompts: Sequence[Sequence[int]],
                   images: Sequence[Sequence[Any]], *, stop_ids: list[int], pad_token_id: int,
                   settings: GenerationSettings, context_len: int | None = None, batch_size: int = 8,
                   progress: bool = False, stream: IO[str] | None = None) -> list[str]:
    """The answers to `prompts` (token ids ending with the assistant header), `images[i]` the images of prompt i
    (each as `vlm.processing.as_image` takes it), decoded `batch_size` rows at a time, longest first, and
    returned in input order. `stream`: a file the answer is written to as it is generated (one prompt only)."""
    from tqdm import tqdm

    if len(prompts) != len(images):
        raise UserError(f"{len(prompts)} prompts but {len(images)} image lists; pass one list (maybe empty) per prompt")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if stream is not None and len(prompts) != 1:
        raise UserError(f"stream= writes one answer as it is generated; got {len(prompts)} prompts")
    streams = [StreamToFile(tokenizer, stream)] if stream is not None else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), disable=not progress, desc="generating", unit="q", file=sys.stderr)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        pixels = load_pixels([image for i in rows for image in images[i]], image_processor)  # (N, 3, H, W) or None
        out = generate_ids(model, [prompts[i] for i in rows], pixels, stop_ids=stop_ids, pad_token_id=pad_token_id,
                           settings=settings, context_len=context_len, streams=streams)
        for i, ids in zip(rows, out):
            answers[i] = decode(tokenizer, ids)
        bar.update(len(rows))
    bar.close()
    return answers
