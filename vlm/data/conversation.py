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
- A too-long sample is never cut through an image run or inside a turn: `truncate="turns"` keeps the
  longest prefix of whole user+assistant pairs that fits (and reports how many images it kept),
  otherwise the sample is rejected as `too_long`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import SampleError
from .sample import validate_messages
from .templates import Groups, Template, get_template
from .tokenizer import IMAGE_TOKEN, get_image_token_id

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

    Returns:
        `EncodedSample` with `input_ids` (T,), `labels` (T,), and the number of images kept.

    Raises:
        SampleError: `bad_schema`, `bad_roles`, `empty_turn`, `placeholder_mismatch`, `too_long` or
            `no_supervised_tokens`, naming the sample and the values involved.
        ValueError: bad arguments (unknown template or truncate mode, template/tokenizer mismatch).
    """
    if truncate not in TRUNCATE_MODES:
        raise ValueError(f"truncate={truncate!r}; expected one of {TRUNCATE_MODES}")
    _check_num_image_tokens(num_image_tokens)
    template = _bind(template, tokenizer)
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list):
        raise SampleError("bad_schema", "a sample must be a dict with a 'messages' list", sample_id=sample_id)
    images = sample.get("images") or []
    if not isinstance(images, list):
        raise SampleError("bad_schema", f"'images' must be a list of paths, got {type(images).__name__}", sample_id=sample_id)
    messages = validate_messages(sample["messages"], sample_id=sample_id)
    messages, prepended = _place_images(messages, len(images), sample_id)
    groups = template.render(messages, tokenizer)
    _check_rendered_images(groups, len(images), sample_id)
    input_ids, labels, token_groups, images_per_group = _encode_groups(groups, tokenizer, template, num_image_tokens)
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
    if all(label == IGNORE_INDEX for label in labels):
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
) -> list[int]:
    """Token ids of a generation prompt: the conversation so far (ending with a user turn) + assistant header.

    Args:
        messages: optional system message, then alternating user/assistant messages ending with user.
        num_images: how many images come with the prompt; None means one per `<image>` in the text.
            With `num_images=1` and no `<image>`, one is prepended to the first user turn (as in training).

    Returns:
        input_ids (T,), tokenised exactly as `encode_sample` tokenises the same turns.
    """
    _check_num_image_tokens(num_image_tokens)
    template = _bind(template, tokenizer)
    messages = validate_messages(messages, for_generation=True)
    if num_images is None:
        num_images = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    messages, _ = _place_images(messages, num_images, None)
    groups = template.render(messages, tokenizer, add_generation_prompt=True)
    _check_rendered_images(groups, num_images, None)
    return _encode_groups(groups, tokenizer, template, num_image_tokens)[0]


def _bind(template: str | Template, tokenizer: Any) -> Template:
    if isinstance(template, str):
        return get_template(template, tokenizer)
    if isinstance(template, Template):
        return template.bind(tokenizer)
    raise TypeError(f"template must be a name or a Template, got {type(template).__name__}")


def _check_num_image_tokens(num_image_tokens: int) -> None:
    if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")


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


def _encode_groups(groups: Groups, tokenizer: Any, template: Template,
                   num_image_tokens: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Tokenise rendered `groups` as one text, split only at `<image>`; returns (input_ids, labels,
    group index of each token, images per group).

    The text between image runs is tokenised as one string, the way the model sees it at inference and
    the way LLaVA's `tokenizer_image_token` does (each chunk between images tokenised on its own), and
    each token is labelled from the character offsets of the pieces it covers (supervised when it
    overlaps a supervised piece). Tokenising turn by turn instead would put token boundaries where
    whole-string tokenisation has none (sentencepiece adds a prefix space to every piece, and merges
    differently after a special token). Groups are only bookkeeping for truncation: a token belongs to
    the group where its text ends.
    """
    runs: list[list[tuple[str, bool, int]] | int] = [[]]  # text segments between images; an int is an image's group
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
                    runs[-1].append((chunk, piece.supervised, g))  # type: ignore[union-attr]
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
            ids, run_labels, run_groups = _tokenize_run(run, tokenizer)
            input_ids += ids
            labels += run_labels
            token_groups += run_groups
    return input_ids, labels, token_groups, images_per_group


def _tokenize_run(segments: list[tuple[str, bool, int]], tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels and group index of each token of consecutive text `(text, supervised, group)` segments."""
    text = "".join(t for t, _, _ in segments)
    spans, position = [], 0  # (start, end, supervised, group) in `text`
    for segment, supervised, group in segments:
        spans.append((position, position + len(segment), supervised, group))
        position += len(segment)
    ids, offsets = _tokenize_with_offsets(text, tokenizer)
    labels, groups = [], []
    for token, (start, end) in zip(ids, offsets):
        if start == end:  # zero-width (e.g. a prefix-space marker): placed by position
            supervised = any(sup and a <= start < b for a, b, sup, _ in spans)
            at = min(start, len(text) - 1)
        else:
            supervised = any(sup and start < b and end > a for a, b, sup, _ in spans)
            at = end - 1
        labels.append(token if supervised else IGNORE_INDEX)
        groups.append(next(g for a, b, _, g in spans if a <= at < b))
    return ids, labels, groups


def _tokenize_with_offsets(text: str, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` (no special tokens added) and each token's character span.

    Fast tokenizers give offsets; for others each token's span is found by decoding growing prefixes of
    the ids, which is exact for tokenizers whose decode reproduces the text.
    """
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    offsets, previous = [], 0
    for k in range(1, len(ids) + 1):
        decoded = len(tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        end = min(max(decoded, previous), len(text))
        offsets.append((previous, end))
        previous = end
    return ids, offsets
