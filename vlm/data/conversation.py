"""Turn a canonical sample into token ids and labels: validated (`sample.py`), `<image>` expanded, replies supervised.

Design choices:
- The template renders the conversation into pieces already marked supervised or not
  (`templates.py`). The rendered text is tokenised as one string between images (so the ids are what
  the model sees at inference, and LLaVA-1.5's ids for its templates), every `<image>` becomes exactly
  `num_image_tokens` image-token ids, and each token is labelled from the character offsets of the
  pieces it covers. The label mask is therefore exact by construction: there is no re-tokenising of
  prefixes and hoping the lengths agree (the "tokenization mismatch" that silently zeroed LLaVA
  samples, e.g. every sample whose reply contains the separator).
- Labels are the input ids on the supervised pieces (reply + end-of-turn) and -100 elsewhere, unshifted:
  the loss shifts.
- Placeholders follow LLaVA: a sample with one image and no `<image>` gets `<image>\\n` prepended to its
  first user turn (reported as `image_prepended`); any other disagreement between placeholders and
  images is a `placeholder_mismatch` naming both counts.
- Special-token strings typed in the data (`<|im_end|>`, `</s>`) become the control tokens, as the
  tokenizer does; with `escape_special_tokens=True` they are tokenised as their characters while the
  template's markers stay control tokens, exactly as a tokenizer without those special tokens would
  tokenise the text (the escaping section below says how).
- A too-long sample is never cut through an image run or inside a turn: `truncate="turns"` keeps the
  longest prefix of whole user+assistant pairs that fits (and reports how many images it kept),
  otherwise the sample is rejected as `too_long`.
"""

from __future__ import annotations

import bisect
import itertools
import re
import weakref
from dataclasses import dataclass
from typing import Any

from vlm.errors import ConfigError

from .errors import SampleError
from .sample import validate_messages
from .templates import Groups, Template, get_template
from .tokenizer import IMAGE_TOKEN, get_image_token_id, special_token_strings, token_id

IGNORE_INDEX = -100
TRUNCATE_MODES = ("none", "turns")


@dataclass
class EncodedSample:
    """Token ids and labels of one sample (same length); `num_images` images are referenced, in order."""

    input_ids: list[int]
    labels: list[int]
    num_images: int
    image_prepended: bool


def encode_sample(
    sample: dict,
    tokenizer: Any,
    template: str | Template,
    *,
    num_image_tokens: int,
    max_length: int | None = None,
    truncate: str = "none",
    escape_special_tokens: bool = False,
) -> EncodedSample:
    """Tokenise a canonical sample `{"id", "images", "messages"}` for training.

    Args:
        sample: canonical sample; `images` may be absent for text-only samples.
        tokenizer: a Hugging Face tokenizer that has `<image>` (see `tokenizer.ensure_image_token`).
        template: a `Template` or a registry name / LLaVA `--version` alias.
        num_image_tokens: ids each `<image>` expands to (the projector's output length).
        max_length: longest allowed sequence (image tokens included); None for no limit.
        truncate: "none" rejects longer samples; "turns" keeps the longest prefix of whole
            user+assistant pairs that fits.
        escape_special_tokens: tokenise special-token strings in the messages (`<|im_end|>`, `</s>`...) as
            the plain text they are (`split_special_tokens`), not as control tokens; the template's own
            markers stay control tokens (module docstring).

    Returns:
        `EncodedSample` with `input_ids` (T,), `labels` (T,), and the number of images kept.

    Raises:
        SampleError: `bad_schema`, `bad_roles`, `empty_turn`, `placeholder_mismatch`, `too_long` or
            `no_supervised_tokens`, naming the sample and the values involved.
        ValueError: bad arguments (unknown template or truncate mode, template/tokenizer mismatch).
    """
    check_encode_options(num_image_tokens, truncate)
    template = _bind(template, tokenizer)
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list):
        raise SampleError("bad_schema", "a sample must be a dict with a 'messages' list", sample_id=sample_id)
    images = sample.get("images") or []
    if not isinstance(images, list):
        raise SampleError("bad_schema", f"'images' must be a list of paths, got {type(images).__name__}", sample_id=sample_id)
    messages = validate_messages(sample["messages"], sample_id=sample_id)
    messages, prepended = _place_images(messages, len(images), sample_id)
    messages, escapes = _mask_special_strings(messages, tokenizer) if escape_special_tokens else (messages, {})
    groups = template.render(messages, tokenizer)
    _check_rendered_images(groups, len(images), sample_id)
    input_ids, labels, token_groups, images_per_group = _encode_groups(groups, tokenizer, template, num_image_tokens,
                                                                       escapes)
    lengths = [0] * len(groups)
    for g in token_groups:
        lengths[g] += 1
    total = len(input_ids)
    kept = len(groups)
    if max_length is not None and total > max_length:
        image_tokens = len(images) * num_image_tokens
        if truncate == "none":
            raise SampleError(
                "too_long",
                f"{total} tokens ({image_tokens} of them image tokens) > max_length {max_length}; raise "
                "--model_max_length or use truncate='turns' to keep the first turns",
                sample_id=sample_id,
            )
        kept = 0
        while kept < len(lengths) and sum(lengths[: kept + 1]) <= max_length:
            kept += 1
        if kept < 2:  # group 0 is the preamble; at least one user+assistant pair must fit
            first = sum(lengths[:2])
            raise SampleError(
                "too_long",
                f"even the first user+assistant turn needs {first} tokens > max_length {max_length} "
                f"(whole sample {total} tokens, {image_tokens} image tokens); raise --model_max_length",
                sample_id=sample_id,
            )
        keep = [g < kept for g in token_groups]
        input_ids = [i for i, k in zip(input_ids, keep) if k]
        labels = [label for label, k in zip(labels, keep) if k]
    if labels.count(IGNORE_INDEX) == len(labels):
        raise SampleError("no_supervised_tokens", "no assistant reply tokens to learn from", sample_id=sample_id)
    num_images = sum(images_per_group[:kept])
    return EncodedSample(input_ids=input_ids, labels=labels, num_images=num_images, image_prepended=prepended)


def encode_prompt(
    messages: list[dict],
    tokenizer: Any,
    template: str | Template,
    *,
    num_image_tokens: int,
    num_images: int | None = None,
    escape_special_tokens: bool = False,
) -> list[int]:
    """Token ids of a generation prompt: the conversation so far (ending with a user turn) + assistant header.

    Args:
        messages: optional system message, then alternating user/assistant messages ending with user.
        num_images: how many images come with the prompt; None means one per `<image>` in the text.
            With `num_images=1` and no `<image>`, one is prepended to the first user turn (as in training).
        escape_special_tokens: as in `encode_sample`.

    Returns:
        input_ids (T,), tokenised exactly as `encode_sample` tokenises the same turns.
    """
    check_encode_options(num_image_tokens)
    template = _bind(template, tokenizer)
    messages = validate_messages(messages, for_generation=True)
    if num_images is None:
        num_images = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    messages, _ = _place_images(messages, num_images, None)
    messages, escapes = _mask_special_strings(messages, tokenizer) if escape_special_tokens else (messages, {})
    groups = template.render(messages, tokenizer, add_generation_prompt=True)
    _check_rendered_images(groups, num_images, None)
    return _encode_groups(groups, tokenizer, template, num_image_tokens, escapes)[0]


def _bind(template: str | Template, tokenizer: Any) -> Template:
    if isinstance(template, str):
        return get_template(template, tokenizer)
    if isinstance(template, Template):
        return template.bind(tokenizer)
    raise TypeError(f"template must be a name or a Template, got {type(template).__name__}")


def check_encode_options(num_image_tokens: int, truncate: str = "none") -> None:
    """ConfigError for a `num_image_tokens` or `truncate` that `encode_sample` cannot take."""
    if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
        raise ConfigError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
    if truncate not in TRUNCATE_MODES:
        raise ConfigError(f"truncate={truncate!r}; expected one of {TRUNCATE_MODES}")


def _place_images(messages: list[dict], num_images: int, sample_id: str | None) -> tuple[list[dict], bool]:
    """Check placeholders against images; prepend `<image>\\n` to the first user turn for 1 image and 0 placeholders."""
    for i, message in enumerate(messages):
        if message["role"] != "user" and IMAGE_TOKEN in message["content"]:
            raise SampleError(
                "placeholder_mismatch",
                f"{IMAGE_TOKEN} in message {i} ({message['role']}); images may only be placed in user messages",
                sample_id=sample_id,
            )
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placeholders == num_images:
        return messages, False
    if placeholders == 0 and num_images == 1:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = list(messages)
        messages[first_user] = {"role": "user", "content": f"{IMAGE_TOKEN}\n{messages[first_user]['content']}"}
        return messages, True
    raise SampleError(
        "placeholder_mismatch",
        f"{placeholders} {IMAGE_TOKEN} placeholder(s) in the text but {num_images} image(s); "
        f"put one {IMAGE_TOKEN} per image in the user messages",
        sample_id=sample_id,
    )


def _check_rendered_images(groups: Groups, num_images: int, sample_id: str | None) -> None:
    rendered = sum(piece.text.count(IMAGE_TOKEN) for group in groups for piece in group)
    if rendered != num_images:
        raise SampleError(
            "placeholder_mismatch",
            f"the chat template rendered {rendered} {IMAGE_TOKEN} placeholder(s) for {num_images} image(s)",
            sample_id=sample_id,
        )


def _encode_groups(groups: Groups, tokenizer: Any, template: Template, num_image_tokens: int,
                   escapes: dict[str, str]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Tokenise rendered `groups` as one text, split only at `<image>`; returns (input_ids, labels,
    group index of each token, images per group).

    The text between image runs is tokenised as one string, the way the model sees it at inference and
    the way LLaVA's `tokenizer_image_token` does (each chunk between images tokenised on its own), and
    each token is labelled from the character offsets of the pieces it covers (supervised when it
    overlaps a supervised piece). Tokenising turn by turn instead would put token boundaries where
    whole-string tokenisation has none (sentencepiece adds a prefix space to every piece, and merges
    differently after a special token). Groups are only bookkeeping for truncation: a token belongs to
    the group where its text ends. `escapes` maps the stand-in characters of masked data special-token
    strings back to them (`_mask_special_strings`); those spans are tokenised as text.
    """
    # text segments (text, supervised, group, escaped spans) between images; an int is an image's group
    runs: list[list[tuple[str, bool, int, list[tuple[int, int]]]] | int] = [[]]
    images_per_group = [0] * len(groups)
    for g, group in enumerate(groups):
        for piece in group:
            chunks = piece.text.split(IMAGE_TOKEN)
            assert not (piece.supervised and len(chunks) > 1), "an image placeholder in a supervised piece"
            for k, chunk in enumerate(chunks):
                if k > 0:
                    runs += [g, []]
                    images_per_group[g] += 1
                if chunk:
                    chunk, spans = _unmask_special_strings(chunk, escapes)
                    runs[-1].append((chunk, piece.supervised, g, spans))  # type: ignore[union-attr]
    image_id = get_image_token_id(tokenizer) if any(images_per_group) else None
    input_ids = list(template.leading_ids(tokenizer))
    labels = [IGNORE_INDEX] * len(input_ids)
    token_groups = [0] * len(input_ids)
    for run in runs:
        if isinstance(run, int):
            input_ids += [image_id] * num_image_tokens  # type: ignore[list-item]
            labels += [IGNORE_INDEX] * num_image_tokens
            token_groups += [run] * num_image_tokens
        elif run:
            ids, run_labels, run_groups = _tokenize_run_once(run, tokenizer)
            input_ids += ids
            labels += run_labels
            token_groups += run_groups
    return input_ids, labels, token_groups, images_per_group


def _tokenize_run(segments: list[tuple[str, bool, int, list[tuple[int, int]]]],
                  tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels and group index of each token of consecutive text `(text, supervised, group, escaped
    spans)` segments."""
    text = "".join(t for t, _, _, _ in segments)
    spans, escaped, position = [], [], 0  # (start, end, supervised, group) in `text`; escaped (start, end)
    for segment, supervised, group, segment_escaped in segments:
        spans.append((position, position + len(segment), supervised, group))
        escaped += [(position + a, position + b) for a, b in segment_escaped]
        position += len(segment)
    ids, offsets = _tokenize_with_offsets(text, tokenizer, escaped)
    # The spans tile `text` in order, so the spans a token overlaps run from the one holding its first character
    # to the one holding its last (found by bisection), and a count of supervised spans tells whether any is.
    starts = [a for a, _, _, _ in spans]
    supervised_before = list(itertools.accumulate((sup for _, _, sup, _ in spans), initial=0))
    last = len(text) - 1
    labels, groups = [], []
    for token, (start, end) in zip(ids, offsets):
        first = bisect.bisect_right(starts, start) - 1
        if start == end:  # zero-width (e.g. a prefix-space marker): placed by position
            supervised = start <= last and spans[first][2]
            at = min(start, last)
        else:
            at = end - 1
            supervised = supervised_before[bisect.bisect_right(starts, at)] > supervised_before[first]
        labels.append(token if supervised else IGNORE_INDEX)
        groups.append(spans[bisect.bisect_right(starts, at) - 1][3])
    return ids, labels, groups


# Runs met again and again, such as a template's system prompt and first user header before a leading `<image>`,
# are tokenised once per tokenizer: their (ids, labels, groups) are kept under the run's segments, the vocabulary
# size and the added tokens (so adding a token, or making one special, gives new keys). Only short runs with no
# reply in them are kept (a reply makes a run unique: it would only fill memory), at most _RUN_CACHE_SIZE per
# tokenizer.
_RUN_CACHE_SIZE = 64
_RUN_CACHE_MAX_CHARS = 1024
_run_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenize_run_once(segments: list[tuple[str, bool, int, list[tuple[int, int]]]],
                       tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """`_tokenize_run(segments, tokenizer)`, from the cache when this run was tokenised before (as tuples)."""
    if any(supervised for _, supervised, _, _ in segments) or \
            sum(len(text) for text, _, _, _ in segments) > _RUN_CACHE_MAX_CHARS:
        return _tokenize_run(segments, tokenizer)  # type: ignore[return-value]
    added = tuple((i, str(token), getattr(token, "special", None))
                  for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items())
    key = (len(tokenizer), added,
           tuple((text, supervised, group, tuple(escaped)) for text, supervised, group, escaped in segments))
    cache = _run_caches.get(tokenizer)
    if cache is None:
        cache = _run_caches.setdefault(tokenizer, {})
    found = cache.get(key)
    if found is None:
        found = tuple(tuple(part) for part in _tokenize_run(segments, tokenizer))
        if len(cache) >= _RUN_CACHE_SIZE:
            cache.clear()  # the usual runs come back at once; one atomic step is safe beside other threads
        cache[key] = found
    return found  # type: ignore[return-value]


def _tokenize_with_offsets(text: str, tokenizer: Any, escaped: list[tuple[int, int]] = (),
                           ) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` (no special tokens added) and each token's character span; the special-token strings at
    the `escaped` spans are tokenised as plain text (`_escape_regions`).

    Fast tokenizers give offsets; for others each token's span is found by decoding growing prefixes of
    the ids, which is exact for tokenizers whose decode reproduces the text.
    """
    ids, offsets = _native_tokens(text, tokenizer, split_special_tokens=False)
    if escaped:
        ids, offsets = _escape_regions(text, tokenizer, ids, offsets, escaped)
    return ids, offsets


def _native_tokens(text: str, tokenizer: Any, *, split_special_tokens: bool,
                   continuation: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """`tokenizer(text)`'s ids and character spans; `continuation`: as the text is tokenised when it follows a
    special token (Metaspace "first" adds its prefix "▁" only at the very start of the string)."""
    if getattr(tokenizer, "is_fast", False):
        if continuation and split_special_tokens:
            backend = _continuation_backend(tokenizer)
            if backend is not None:
                encoding = backend.encode(text, add_special_tokens=False)
                return list(encoding.ids), [tuple(o) for o in encoding.offsets]
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                             split_special_tokens=split_special_tokens)
        return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"])
    offsets, previous = [], 0
    for k in range(1, len(ids) + 1):
        decoded = len(tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        end = min(max(decoded, previous), len(text))
        offsets.append((previous, end))
        previous = end
    return ids, offsets


# --- escaping special-token strings in the data (`escape_special_tokens=True`)
#
# The rendered text is tokenised as one string, so the tokenizer cannot tell the template's `<|im_end|>` from one
# typed by a user. The data's occurrences are therefore masked before rendering (each special-token string
# replaced by a private-use character absent from the conversation), found again in the rendered pieces, and
# unmasked with their spans recorded. Tokenising: the tokenizer splits its input at special tokens and
# tokenises the text between them on its own; the regions between the template's special tokens that hold an
# escaped span are tokenised again with `split_special_tokens=True`, the rest keeps the ids it had, so a sample
# without special strings in its text is tokenised exactly as without escaping.

_MASK_BASE = 0xF0000  # Supplementary Private Use Area-A


def _mask_special_strings(messages: list[dict], tokenizer: Any) -> tuple[list[dict], dict[str, str]]:
    """`messages` with each special-token string (but `<image>`) replaced by a stand-in character, and the map
    back; unchanged and {} when none occurs."""
    strings = [t for t in special_token_strings(tokenizer) if t != IMAGE_TOKEN]
    text = "".join(m["content"] for m in messages)
    present = sorted((t for t in strings if t in text), key=len, reverse=True)  # longest first in the pattern
    if not present:
        return messages, {}
    stand_ins = (chr(c) for c in range(_MASK_BASE, _MASK_BASE + 0xFFFD) if chr(c) not in text)
    to_mask = {t: next(stand_ins) for t in present}
    pattern = re.compile("|".join(map(re.escape, present)))
    masked = [{**m, "content": pattern.sub(lambda hit: to_mask[hit.group(0)], m["content"])} for m in messages]
    return masked, {mask: t for t, mask in to_mask.items()}


def _unmask_special_strings(text: str, escapes: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """`text` with the stand-ins put back, and the (start, end) spans of the strings they stood for."""
    if not escapes or not any(mask in text for mask in escapes):
        return text, []
    out, spans, position = [], [], 0
    for char in text:
        original = escapes.get(char)
        if original is None:
            out.append(char)
            position += 1
        else:
            out.append(original)
            spans.append((position, position + len(original)))
            position += len(original)
    return "".join(out), spans


def _escape_regions(text: str, tokenizer: Any, ids: list[int], offsets: list[tuple[int, int]],
                    escaped: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The native tokens of `text` with each region between two template special tokens that holds an
    escaped span tokenised again as text (`split_special_tokens=True`)."""
    special_ids = {token_id(tokenizer, t) for t in special_token_strings(tokenizer)} - {None}

    def is_escaped(start: int) -> bool:
        return any(a <= start < b for a, b in escaped)

    bounds = [k for k, (i, (start, _)) in enumerate(zip(ids, offsets)) if i in special_ids and not is_escaped(start)]
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    previous = -1
    for bound in bounds + [len(ids)]:
        start = offsets[previous][1] if previous >= 0 else 0
        end = offsets[bound][0] if bound < len(ids) else len(text)
        if any(start <= a < end for a, _ in escaped):
            region_ids, region_offsets = _native_tokens(text[start:end], tokenizer, split_special_tokens=True,
                                                        continuation=start > 0)
            out_ids += region_ids
            out_offsets += [(a + start, b + start) for a, b in region_offsets]
        else:
            out_ids += ids[previous + 1:bound]
            out_offsets += offsets[previous + 1:bound]
        if bound < len(ids):
            out_ids.append(ids[bound])
            out_offsets.append(offsets[bound])
        previous = bound
    return out_ids, out_offsets


_continuation_backends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _continuation_backend(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer's backend that tokenises text as it is tokenised after a special token,
    with special-token strings split: None when the tokenizer itself does (no Metaspace with
    `prepend_scheme="first"`, which adds "▁" at the start of the string only). Made once per tokenizer."""
    if tokenizer in _continuation_backends:
        return _continuation_backends[tokenizer]
    from tokenizers import Tokenizer, pre_tokenizers

    def never(pre: Any) -> Any:
        if isinstance(pre, pre_tokenizers.Metaspace) and str(pre.prepend_scheme) == "first":
            return pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="never", split=pre.split)
        if isinstance(pre, pre_tokenizers.Sequence):
            parts = []
            while True:
                try:
                    parts.append(pre[len(parts)])
                except IndexError:
                    break
            changed = [never(part) for part in parts]
            return pre_tokenizers.Sequence(changed) if any(c is not p for c, p in zip(changed, parts)) else pre
        return pre

    backend = tokenizer.backend_tokenizer
    changed = never(backend.pre_tokenizer) if backend.pre_tokenizer is not None else None
    copy = None
    if changed is not None and changed is not backend.pre_tokenizer:
        copy = Tokenizer.from_str(backend.to_str())
        copy.pre_tokenizer = changed
        copy.encode_special_tokens = True
        copy.no_truncation()
        copy.no_padding()
    _continuation_backends[tokenizer] = copy
    return copy
