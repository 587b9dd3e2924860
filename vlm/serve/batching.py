"""The request queue: waiting requests batched into one call of the one decode loop by a worker thread.

Design choices:
- One worker thread owns the model: requests never decode concurrently (a model is not thread-safe, and on
  one device a batch is faster than interleaved single requests).
- The worker takes the oldest waiting job, then gathers jobs with the same decoding settings (temperature,
  top_p, max_new_tokens) for up to `batch_wait_ms` or until `max_batch_size` are in hand, and decodes them
  in one left-padded `generate` call (`vlm.generate.decoding.generate_ids`, the loop `Generator.reply_many`
  runs). Greedy batched answers equal one-at-a-time answers (tests/test_generate.py; tests/test_serve.py
  checks it through the server). Jobs with other settings wait for a later batch, in arrival order.
- Streamed jobs batch too, with each other and with plain ones: the decode loop streams per row
  (`vlm.generate.decoding.RowText`); a stream that stops early (a stop string, the client left) ends its own
  row only.
- The queue is bounded: `submit` raises `QueueFull` when `max_queue` jobs are waiting (the caller answers 503).
- The counters (`stats`) show that batching happens: generate calls, jobs answered, batch sizes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from vlm.generate.decoding import GenerationSettings, RowText, decode, generate_ids
from vlm.processing import load_pixels, pad_id, stop_token_ids

log = logging.getLogger("vlm.serve")


class QueueFull(Exception):
    """`max_queue` jobs are already waiting."""


@dataclass
class Completion:
    """A job's answer: the text (whitespace stripped, as every vlm answer), token counts, why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated, the end-of-turn token included
    finish_reason: str  # "stop": end-of-turn token, eos or a stop string; "length": max_new_tokens reached


@dataclass
class Job:
    """One request, ready to decode: its prompt ids and images (decoded and checked), and its settings."""

    prompt: list[int]  # (T,) ids ending with the assistant header
    images: list[Any]  # PIL images, in the order of the prompt's image runs
    settings: GenerationSettings
    # streaming: called with each decoded piece; may raise vlm.generate.decoding.StopGeneration to end this job
    on_text: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share a generate call."""
        return (self.settings.temperature, self.settings.top_p, self.settings.max_new_tokens)


@dataclass
class BatchStats:
    generate_calls: int = 0
    jobs_answered: int = 0
    jobs_failed: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {"generate_calls": self.generate_calls, "jobs_answered": self.jobs_answered,
                "jobs_failed": self.jobs_failed, "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class Batcher:
    """A bounded queue of `Job`s and the worker thread that decodes them in batches with `generator`'s model.
    The sizes are checked once, by `vlm.serve.app.ServeConfig`."""

    def __init__(self, generator, *, max_batch_size: int = 8, batch_wait_ms: float = 10.0, max_queue: int = 64):
        self.generator = generator
        self.max_batch_size, self.batch_wait_s, self.max_queue = max_batch_size, batch_wait_ms / 1000, max_queue
        self.stop_ids = stop_token_ids(generator.tokenizer, generator.template)
        self.pad_token_id = pad_id(generator.tokenizer)
        self.stats = BatchStats()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the queue ------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future gets a `Completion` (or the exception decoding raised). QueueFull when full."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max_queue {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify_all()
        return job.future

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vlm-serve-batcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the worker after its current batch; jobs still waiting fail with QueueFull."""
        with self._cond:
            self._closed = True
            left, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in left:
            job.future.set_exception(QueueFull("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and up to `max_batch_size - 1` compatible ones (waiting at most
        `batch_wait_s` for them to arrive); None once closed."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._waiting.popleft()
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                for job in [j for j in self._waiting if j.batch_key == first.batch_key]:
                    if len(batch) == self.max_batch_size:
                        break
                    self._waiting.remove(job)
                    batch.append(job)
                remaining = deadline - time.monotonic()
                if len(batch) == self.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    # -- decoding -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self.run_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to each waiting request; the worker goes on
                log.exception("batch of %d failed", len(batch))
                self.stats.jobs_failed += len(batch)
                for job in batch:
                    job.future.set_exception(exc)
                continue
            self.stats.jobs_answered += len(batch)
            for job, result in zip(batch, results):
                job.future.set_result(result)

    def run_batch(self, batch: list[Job]) -> list[Completion]:
        """Decode `batch` (jobs with one batch key) in one generate call."""
        g = self.generator
        settings = batch[0].settings
        prompts = [job.prompt for job in batch]
        pixels = load_pixels([image for job in batch for image in job.images], g.image_processor)  # (N, 3, H, W)
        streams = [RowText(g.tokenizer, job.on_text) if job.on_text is not None else None for job in batch]
        start = time.perf_counter()
        self.stats.generate_calls += 1
        self.stats.batch_sizes[len(batch)] += 1
        rows = generate_ids(g.model, prompts, pixels, stop_ids=self.stop_ids, pad_token_id=self.pad_token_id,
                            settings=settings, context_len=g.context_len,
                            streams=streams if any(streams) else None)
        log.info("generate call %d: %d request(s), %.0f ms", self.stats.generate_calls, len(batch),
                 (time.perf_counter() - start) * 1000)
        # as generate_ids caps it: prompt + answer fit the context
        cap = max(1, min(settings.max_new_tokens, g.context_len - max(len(p) for p in prompts)))
        results = []
        for prompt, row, stream in zip(prompts, rows, streams):
            if stream is not None and stream.stopped:  # ended by its stream (a stop string, the client left)
                results.append(Completion(decode(g.tokenizer, row), len(prompt), stream.tokens, "stop"))
                continue
            hit_cap = len(row) >= cap
            results.append(Completion(decode(g.tokenizer, row), len(prompt), len(row) + (0 if hit_cap else 1),
                                      "length" if hit_cap else "stop"))
        return results
