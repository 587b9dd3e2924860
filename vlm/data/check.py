"""Validate a dataset the way training will use it, and write the validation report (DESIGN.md contract).

    kept, report = check_dataset(parse_sources("data.json", "images"), tokenizer=tok, template="vicuna_v1",
                                 num_image_tokens=576, max_length=2048)
    enforce_max_drop_ratio(report, 0.01, report_path="report.json")

Report: `{"total", "kept", "dropped": {reason: count}, "problems": [{"index", "id", "reason", "detail"}],
"notes": {...}}`. `dropped` lists the reasons that occurred, in `REASONS` order; `problems` has one
entry per dropped sample (its first failing check). `notes` is ours, not part of the contract:
`image_prepended` (samples with one image and no `<image>`, fixed as LLaVA does, not dropped), the
sources with their formats (and what detection saw), the settings, the checks that were skipped,
`duplicate_ids` and `special_tokens` (below).

Design choices:
- Checks run in order, cheapest first, and stop at the first failure (`check_sample`): the reader's
  verdict (`bad_schema`...), `sample.validate_sample` (`bad_schema`, `bad_roles`,
  `no_supervised_tokens`, `empty_turn`), image paths (`unsafe_path`, `missing_image`;
  `unreadable_image` with `check_images="full"`), then `conversation.encode_sample` with the training
  template and tokenizer (`placeholder_mismatch`, `too_long`, `no_supervised_tokens`) —
  `SupervisedDataset` runs the same `check_sample`, so check and training cannot disagree.
- Indices are positions in the mixed dataset (what `SupervisedDataset` indexes); the repeats of one
  record are checked once.
- Tokenising dominates the time (~1 ms per LLaVA-665K-like sample on one core), so large sets are
  checked in forked worker processes (`num_workers`), results gathered in order.
- Two things are noted, never dropped: `duplicate_ids` (records sharing an id with an earlier
  record; repeats of one record in the mix are not duplicates) and `special_tokens` (message text
  holding a special-token string of the tokenizer or the template, such as `<|im_end|>` or `</s>`,
  other than `<image>`: the tokenizer turns it into the real control token, so the text ends a turn
  or the sequence where the data meant plain text). With `escape_special_tokens` (the
  `--escape_special_tokens` flag of training and of `vlm data check`) the tokenizer's special-token
  strings in message text are tokenised as their characters while the template's markers stay
  control tokens (`conversation.encode_sample`); the note still counts them and says they were escaped.
- Without a tokenizer the token checks still run on a stand-in tokenizer trained on the data's own
  text (`build_tokenizer`), which decides placeholders and supervision exactly, but token counts
  would be meaningless, so `too_long` is skipped and `notes.skipped` says so. Pass the model's
  tokenizer to check lengths.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import signal
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable, Sequence

from vlm.data.conversation import IGNORE_INDEX, EncodedSample, check_encode_options, encode_sample
from vlm.data.errors import REASONS, DataError, SampleError
from vlm.data.mix import MixedRecords, Source
from vlm.data.paths import CHECK_MODES, ImageFolder
from vlm.data.sample import PREFERENCE_KEYS, is_preference, validate_sample
from vlm.data.templates import Template, get_template
from vlm.data.tokenizer import IMAGE_TOKEN, build_tokenizer, special_token_strings
from vlm.errors import ConfigError
from vlm.visual.processor import PIL_DEFAULT_MAX_IMAGE_PIXELS

_STAND_IN_SAMPLES = 2000  # samples whose text trains the stand-in tokenizer
_TOP_PROBLEMS = 5  # problems quoted in the max-drop-ratio error
_PARALLEL_FROM = 2000
_PROGRESS_FROM = 2000  # smaller sets check in a moment: no progress bar
_NOTE_EXAMPLES = 5  # duplicate ids / samples with special tokens named in the notes
_HINTS = {  # the usual cause of a reason, quoted when it makes training stop
    "missing_image": "missing_image: is --image_folder the folder the image paths are relative to?",
    "too_long": "too_long: raise --model_max_length, or truncate='turns' to keep the first turns.",
    "placeholder_mismatch": "placeholder_mismatch: one <image> per image, in user turns only.",
}  # samples above which num_workers=None checks in parallel


class _SampleList(Sequence):
    """Plain samples (or SampleErrors) under one image folder, with `MixedRecords`' interface."""

    def __init__(self, samples: Iterable[dict | SampleError], image_folder: str | None):
        self._items = list(samples)
        self._folder = ImageFolder(image_folder)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[dict | SampleError, ImageFolder, str]:
        return self._items[index], self._folder, ""

    def record_of(self, index: int) -> int:
        return index

    def describe(self) -> list[dict[str, Any]]:
        return [{"path": None, "image_folder": self._folder.root, "format": "samples", "records": len(self),
                 "in_mix": len(self)}]


def as_records(
    data: MixedRecords | Source | Sequence[Source] | Iterable[dict | SampleError],
    *,
    image_folder: str | None = None,
    seed: int = 0,
) -> MixedRecords | _SampleList:
    """Anything `check_dataset` accepts -> an indexed sequence of (sample | SampleError, folder, where)."""
    if isinstance(data, MixedRecords):
        return data
    if isinstance(data, Source):
        data = [data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(s, Source) for s in data):
        if image_folder is not None:
            raise ValueError("image_folder= is for plain samples; each Source carries its own image_folder")
        return MixedRecords(data, seed=seed)
    return _SampleList(data, image_folder)


def check_dataset(
    data: MixedRecords | Source | Sequence[Source] | Iterable[dict | SampleError],
    *,
    image_folder: str | None = None,
    tokenizer: Any = None,
    template: Any = "vicuna_v1",
    num_image_tokens: int = 576,
    max_length: int | None = None,
    truncate: str = "none",
    check_images: str | bool = "full",
    max_image_pixels: int | None = PIL_DEFAULT_MAX_IMAGE_PIXELS,
    seed: int = 0,
    num_workers: int | None = None,
    escape_special_tokens: bool = False,
) -> tuple[list[int], dict]:
    """Run every check on every sample; return (indices of kept samples, report).

    Args:
        data: a `MixedRecords`, `Source`(s) (mixed with `seed`), or canonical samples / SampleErrors.
        image_folder: the folder of plain samples' images (Sources carry their own).
        tokenizer: the training tokenizer; None uses a stand-in and skips `too_long` (module docstring).
        template: chat template name or `Template`, as in training.
        num_image_tokens: tokens each image expands to.
        max_length: longest sequence (`--model_max_length`); None: no length check.
        truncate: "none" or "turns", as in training.
        check_images: "full" (decode), "exists", "none" (path strings only); True = "full", False = "none".
        max_image_pixels: pixel limit for decoding (`load_image`).
        seed: mixing seed when `data` are Sources.
        num_workers: processes checking in parallel; None: one per CPU (at most 8) for more than
            2,000 samples, else 1.
        escape_special_tokens: tokenise special-token strings in the data as text, as training will with
            `--escape_special_tokens` (`conversation.encode_sample`); they are still noted.

    Returns:
        (kept indices into the data, report dict as in the module docstring).
    """
    mode = ("full" if check_images else "none") if isinstance(check_images, bool) else check_images
    if mode not in CHECK_MODES:
        raise ConfigError(f"check_images={check_images!r}; expected one of {CHECK_MODES}")
    check_encode_options(num_image_tokens, truncate)
    records = as_records(data, image_folder=image_folder, seed=seed)
    skipped = []
    if tokenizer is None:
        tokenizer = stand_in_tokenizer(records)
        if max_length is not None:
            skipped.append("too_long: no tokenizer given, lengths not checked (pass --tokenizer)")
        max_length = None
    template_name = getattr(template, "name", template)
    # a template that does not exist or does not fit the tokenizer is the user's mistake, said once, up front
    template = get_template(template, tokenizer) if isinstance(template, str) else template.bind(tokenizer)
    if mode != "full":
        skipped.append(f"unreadable_image: images not decoded (check_images={mode})")
    if mode == "none":
        skipped.append("missing_image: files not looked up (check_images=none)")

    checker = _Checker(records, tokenizer, template, num_image_tokens, max_length, truncate, mode, max_image_pixels,
                       escape_special_tokens)
    first_index: dict[int, int] = {}  # stored record -> its first mixed position (repeats share a result)
    for index in range(len(records)):
        first_index.setdefault(records.record_of(index), index)
    results = dict(zip(first_index, _run(checker, list(first_index.values()), num_workers)))

    kept: list[int] = []
    problems: list[dict] = []
    prepended = 0
    for index in range(len(records)):
        problem, was_prepended, _, _ = results[records.record_of(index)]
        if problem is None:
            kept.append(index)
            prepended += was_prepended
        else:
            problems.append({"index": index, **problem})
    counts = Counter(p["reason"] for p in problems)
    report = {
        "total": len(records),
        "kept": len(kept),
        "dropped": {reason: counts[reason] for reason in REASONS if counts[reason]},
        "problems": problems,
        "notes": {
            "image_prepended": prepended,
            "sources": records.describe(),
            "format_detection": records.format_detection() if isinstance(records, MixedRecords) else [],
            "settings": {
                "template": template_name,
                "num_image_tokens": num_image_tokens,
                "max_length": max_length,
                "truncate": truncate,
                "check_images": mode,
                "escape_special_tokens": escape_special_tokens,
            },
            "skipped": skipped,
            "duplicate_ids": _duplicate_ids(first_index, results),
            "special_tokens": _special_tokens_note(first_index, results, checker.special_strings,
                                                   escape_special_tokens),
        },
    }
    return kept, report


def _duplicate_ids(first_index: dict[int, int], results: dict[int, tuple]) -> dict[str, Any]:
    """Records whose id an earlier record already has (a note: ids are not used for training)."""
    seen: dict[str, list[int]] = {}
    for record, index in first_index.items():
        sample_id = results[record][2]
        if sample_id is not None:
            seen.setdefault(sample_id, []).append(index)
    shared = {i: at for i, at in seen.items() if len(at) > 1}
    return {
        "samples": sum(len(at) - 1 for at in shared.values()),
        "ids": len(shared),
        "examples": [{"id": i, "indices": at[:5]} for i, at in itertools.islice(shared.items(), _NOTE_EXAMPLES)],
    }


def _special_tokens_note(first_index: dict[int, int], results: dict[int, tuple], strings: list[str],
                         escaped: bool) -> dict[str, Any]:
    """Samples whose text holds special-token strings, with counts per string (a note, not a drop)."""
    counts: Counter = Counter()
    examples, samples = [], 0
    for record, index in first_index.items():
        found = results[record][3]
        if found:
            samples += 1
            counts.update(dict(found))
            if len(examples) < _NOTE_EXAMPLES:
                examples.append({"index": index, "id": results[record][2], "tokens": dict(found)})
    note: dict[str, Any] = {"samples": samples, "counts": dict(counts.most_common()), "examples": examples,
                            "looked_for": strings, "escaped": escaped}
    if samples and escaped:
        note["why"] = ("escaped (--escape_special_tokens): the tokenizer's special-token strings among these are "
                       "tokenised as their characters; the template's own markers stay control tokens")
    elif samples:
        note["why"] = ("these strings tokenise as the real control tokens (ending a turn or the text), not as the "
                       "characters; pass --escape_special_tokens to tokenise them as text, or rewrite the data")
    return note


def noted_special_strings(tokenizer: Any, template: Any) -> list[str]:
    """Special-token strings of `tokenizer` and the markers of `template`, except `<image>` (placed on purpose)."""
    found = set(special_token_strings(tokenizer))
    try:
        bare = template if isinstance(template, Template) else get_template(template)
    except (TypeError, ValueError):
        bare = None
    if bare is not None:
        found.update(bare.markers)
        if bare.end_of_turn_is_token and bare.end_of_turn:
            found.add(bare.end_of_turn)
    return sorted(t for t in found if isinstance(t, str) and t and t != IMAGE_TOKEN)


def check_sample(item: dict | SampleError, folder: ImageFolder, tokenizer: Any, template: Any, *,
                 image_check: str = "exists", max_image_pixels: int | None = PIL_DEFAULT_MAX_IMAGE_PIXELS,
                 **encode_options: Any) -> tuple[EncodedSample, list]:
    """Every check of one sample, in the one order `vlm data check` and training (`SupervisedDataset`) share, so
    a bad sample gets the same reason from both; raises the first failure as a `SampleError`.

    The reader's verdict (`item` is a SampleError), `sample.validate_sample` (`bad_schema`, `bad_roles`,
    `no_supervised_tokens`, `empty_turn`; for a preference sample `empty_answer`, `same_answers`), each image under `image_check` (`unsafe_path`, `missing_image`,
    `unreadable_image`; "full" decodes, "exists" looks the file up, "none" checks the path string, "open"
    decodes and returns the images), then `conversation.encode_sample` with `encode_options`
    (`placeholder_mismatch`, `too_long`, `no_supervised_tokens`, `template_mismatch`).

    A preference sample is encoded as its prompt + chosen and prompt + rejected (`encode_preference_sides`:
    `too_long` when the longer side does not fit); the prompt + chosen encoding is returned.

    Returns:
        (the encoded sample, the decoded RGB images in order with "open", else []).
    """
    if isinstance(item, SampleError):
        raise item
    validate_sample(item)
    opened = []
    for image in item["images"]:
        if image_check == "open":
            opened.append(folder.open(image, max_image_pixels=max_image_pixels))
        else:
            folder.check(image, image_check, max_image_pixels=max_image_pixels)
    if is_preference(item):
        return encode_preference_sides(item, tokenizer, template, **encode_options)[0], opened
    return encode_sample(item, tokenizer, template, **encode_options), opened


def encode_preference_sides(item: dict, tokenizer: Any, template: Any, **encode_options: Any
                            ) -> tuple[EncodedSample, EncodedSample]:
    """A preference sample's prompt followed by each answer as the assistant's reply, encoded as a supervised
    conversation: (prompt + chosen, prompt + rejected).

    The checks of `encode_sample` apply to both sides (`placeholder_mismatch`, `no_supervised_tokens`, ...), and
    `too_long` when the prompt with either answer, so with the longer one, exceeds `max_length`. A pair is never
    truncated: `truncate="turns"` could only keep the prompt's first turns and lose the answers, so it checks
    as "none" here."""
    encode_options = {**encode_options, "truncate": "none"}
    base = {k: v for k, v in item.items() if k not in PREFERENCE_KEYS}
    replies = 1 + sum(m.get("role") == "assistant" for m in item["messages"])
    sides = []
    for key in PREFERENCE_KEYS:
        side = {**base, "messages": [*item["messages"], {"role": "assistant", "content": item[key]}]}
        try:
            sides.append(encode_sample(side, tokenizer, template, **encode_options))
        except SampleError as e:
            raise SampleError(e.reason, f"prompt + {key}: {e.detail}", sample_id=e.sample_id) from None
        # Preference training labels only the final reply, found as the last labelled run: a template that writes
        # replies back to back (`plain`) joins them, so the pair is dropped here, in the report, not mid-run.
        if labelled_runs(sides[-1].labels) != replies:
            raise SampleError("template_mismatch", f"prompt + {key}: the template joins the {replies} replies into "
                              "fewer labelled runs, so the final reply cannot be told apart; use a chat template "
                              "(--version) or a single-turn prompt", sample_id=item.get("id"))
    return sides[0], sides[1]


def labelled_runs(labels: list[int]) -> int:
    """How many maximal runs of supervised positions `labels` holds."""
    return sum(1 for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))


class _Checker:
    """Checks the sample at one position of `records`; everything it needs travels with it to workers."""

    def __init__(self, records, tokenizer, template, num_image_tokens, max_length, truncate, mode, max_image_pixels,
                 escape_special_tokens):
        self.records = records
        self.tokenizer = tokenizer
        self.template = template
        self.encode_options = dict(num_image_tokens=num_image_tokens, max_length=max_length, truncate=truncate,
                                   escape_special_tokens=escape_special_tokens)
        self.mode = mode
        self.max_image_pixels = max_image_pixels
        self.special_strings = noted_special_strings(tokenizer, template)
        self._special = re.compile("|".join(map(re.escape, self.special_strings))) if self.special_strings else None

    def __call__(self, index: int) -> tuple[dict | None, bool, str | None, tuple | None]:
        """(problem without its index, or None; whether `<image>` was prepended; the sample's id;
        the special-token strings in its text as ((string, count), ...), or None)."""
        item, folder, where = self.records[index]
        sample_id = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None
        specials = self._specials(item)
        try:
            encoded, _ = check_sample(item, folder, self.tokenizer, self.template, image_check=self.mode,
                                      max_image_pixels=self.max_image_pixels, **self.encode_options)
        except SampleError as e:
            from_reader = e is item  # a reader's error already names its file and record
            detail = f"{e.detail} ({where})" if where and not from_reader else e.detail
            return {"id": sample_id or e.sample_id, "reason": e.reason, "detail": detail}, False, sample_id, specials
        return None, encoded.image_prepended, sample_id, specials

    def _specials(self, item: Any) -> tuple | None:
        """The special-token strings in a sample's message text, as ((string, count), ...), or None."""
        messages = item.get("messages") if isinstance(item, dict) else None
        if self._special is None or not isinstance(messages, list):
            return None
        texts = [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
        texts += [item[k] for k in PREFERENCE_KEYS if isinstance(item.get(k), str)]
        found = Counter(t for text in texts for t in self._special.findall(text))
        return tuple(sorted(found.items())) or None


# Set in each worker process (never in the parent) by `_init_worker`; the fork start method hands
# the checker over without pickling the records.
_worker_checker: _Checker | None = None


def _init_worker(checker: _Checker) -> None:
    global _worker_checker
    _worker_checker = checker
    # Ctrl-C reaches the whole process group: the parent stops the pool; workers printing tracebacks is noise
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_positions(positions: list[int]) -> list[tuple]:
    assert _worker_checker is not None, "worker not initialised"
    return [_worker_checker(p) for p in positions]


def _run(checker: _Checker, positions: list[int], num_workers: int | None) -> list[tuple]:
    """`checker` over `positions`, in order; in `num_workers` forked processes when that is worth it.

    A progress bar (stderr) shows for sets of at least `_PROGRESS_FROM` samples."""
    from tqdm.auto import tqdm

    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8) if len(positions) > _PARALLEL_FROM else 1
    bar = tqdm(total=len(positions), desc="data check", unit="sample", disable=len(positions) < _PROGRESS_FROM,
               dynamic_ncols=True)
    with bar:
        if num_workers <= 1 or len(positions) < 2 or "fork" not in multiprocessing.get_all_start_methods():
            results = []
            for p in positions:
                results.append(checker(p))
                bar.update()
            return results
        # a few chunks per worker evens out slow ones; at most 1,000 samples each so the bar moves
        size = min(-(-len(positions) // (num_workers * 4)), 1000)
        chunks = [positions[k : k + size] for k in range(0, len(positions), size)]
        context = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker, initargs=(checker,))
        results = []
        try:
            for chunk in pool.map(_check_positions, chunks):
                results += chunk
                bar.update(len(chunk))
        except BaseException:  # Ctrl-C: drop the chunks not started instead of waiting for them
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return results


def stand_in_tokenizer(records: Sequence) -> Any:
    """A small BPE tokenizer trained on the text of the first samples (placeholder/supervision checks only)."""
    texts = []
    for index in range(min(len(records), _STAND_IN_SAMPLES)):
        item = records[index][0]
        if isinstance(item, dict) and isinstance(item.get("messages"), list):
            texts += [m["content"] for m in item["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
            texts += [item[k] for k in PREFERENCE_KEYS if isinstance(item.get(k), str)]
    return build_tokenizer(texts, vocab_size=512)


def enforce_max_drop_ratio(report: dict, max_drop_ratio: float = 0.01, *, report_path: str | None = None) -> None:
    """Raise DataError (a UserError) when more than `max_drop_ratio` of the samples would be dropped, or none is
    left (even with `max_drop_ratio` 1: there is nothing to train on); the message is `drop_ratio_verdict`'s."""
    verdict = drop_ratio_verdict(report, max_drop_ratio, report_path=report_path)
    if verdict:
        raise DataError(verdict)


def drop_ratio_verdict(report: dict, max_drop_ratio: float = 0.01, *, report_path: str | None = None) -> str | None:
    """None when training may go on with the kept samples; else why not, in one line: the counts by reason, the
    first problems and where the full report is."""
    if not 0 <= max_drop_ratio <= 1:
        raise ConfigError(f"--max_drop_ratio must be in [0, 1], got {max_drop_ratio}")
    total, dropped = report["total"], report["total"] - report["kept"]
    where = f"; full report: {report_path}" if report_path else ""
    if total == 0:
        return f"the dataset has no samples{where}"
    if dropped / total <= max_drop_ratio and report["kept"] > 0:
        return None
    by_reason = ", ".join(f"{reason}={count}" for reason, count in report["dropped"].items())
    top = "; ".join(
        f"[{p['index']}] {p['id']!r} {p['reason']}: {p['detail']}" for p in itertools.islice(report["problems"], _TOP_PROBLEMS)
    )
    hints = "".join(f" {_HINTS[r]}" for r in report["dropped"] if r in _HINTS)
    if report["kept"] == 0:
        return (f"all {total} samples would be dropped ({by_reason}), nothing is left to train on. First problems: "
                f"{top}{where}.{hints} Fix the data (see `vlm data check`).")
    return (f"{dropped} of {total} samples ({dropped / total:.1%}) would be dropped, more than --max_drop_ratio "
            f"{max_drop_ratio}: {by_reason}. First problems: {top}{where}.{hints} Fix the data (see `vlm data check`) "
            "or raise --max_drop_ratio to train on the rest.")
