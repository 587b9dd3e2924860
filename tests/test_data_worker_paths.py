"""The data worker's faster paths (issue 12 point 4) give what the plain paths gave.

- `load_image` hands back the decoded RGB image itself (no copy) and still lets go of the file;
- a tokenised run's labels and groups, found by bisection over the pieces, follow the definition (a token is
  supervised when it overlaps a supervised piece; it belongs to the piece holding its last character);
- a run met again (the template's system prompt before a leading `<image>`) is tokenised once per tokenizer,
  and a change to the tokenizer is seen.
Pixel parity of the normalisation with transformers is tests/test_processor.py's (tolerance 0).
"""

from __future__ import annotations

import os
import random

import numpy as np
from PIL import Image

from vlm.data import conversation
from vlm.data.conversation import IGNORE_INDEX, encode_sample
from vlm.data.tokenizer import build_tokenizer
from vlm.visual.processor import load_image


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_load_image_returns_the_decode_itself_and_lets_go_of_the_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    before = _open_files()
    image = load_image(path)
    assert _open_files() == before  # the file is closed on return
    path.unlink()  # the pixels are in memory, not read from the file later
    assert image.mode == "RGB" and image.size == (64, 48)
    assert np.array_equal(np.asarray(image), expected)
    image.putpixel((0, 0), (1, 2, 3))  # writable like the copy it replaces
    assert image.getpixel((0, 0)) == (1, 2, 3)


def _labels_by_definition(text, spans, ids, offsets):
    """Each token's label and group as the spans define them, checked span by span."""
    labels, groups = [], []
    for token, (start, end) in zip(ids, offsets):
        if start == end:
            supervised = any(sup and a <= start < b for a, b, sup, _ in spans)
            at = min(start, len(text) - 1)
        else:
            supervised = any(sup and start < b and end > a for a, b, sup, _ in spans)
            at = end - 1
        labels.append(token if supervised else IGNORE_INDEX)
        groups.append(next(g for a, b, _, g in spans if a <= at < b))
    return labels, groups


def test_run_labels_and_groups_follow_the_span_definition(tiny_tokenizer):
    """Random cuts of a text into supervised / unsupervised pieces, token boundaries falling inside pieces too."""
    rng = random.Random(0)
    text = "A chat. USER: what colour is the circle? ASSISTANT: The circle is red, the square blue.</s>"
    for _ in range(60):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 6)))
        bounds = [0, *cuts, len(text)]
        segments, group = [], 0
        for a, b in zip(bounds, bounds[1:]):
            group += rng.random() < 0.4
            segments.append((text[a:b], rng.random() < 0.5, group, []))
        spans, position = [], 0
        for piece, supervised, g, _ in segments:
            spans.append((position, position + len(piece), supervised, g))
            position += len(piece)
        ids, labels, groups = conversation._tokenize_run(segments, tiny_tokenizer)
        _, offsets = conversation._tokenize_with_offsets(text, tiny_tokenizer)
        assert (labels, groups) == _labels_by_definition(text, spans, ids, offsets)
        assert any(label != IGNORE_INDEX for label in labels) == any(s for _, s, _, _ in segments)


def _sample(answer: str) -> dict:
    return {"id": "s", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>\nWhat is there?"},
                                                          {"role": "assistant", "content": answer}]}


def test_a_repeated_run_is_tokenised_once_and_a_changed_tokenizer_is_seen(monkeypatch):
    tokenizer = build_tokenizer(["What is there? A red circle.", "A blue square."], vocab_size=300)
    calls = []
    tokenize = conversation._tokenize_with_offsets
    monkeypatch.setattr(conversation, "_tokenize_with_offsets",
                        lambda text, *args, **kwargs: calls.append(text) or tokenize(text, *args, **kwargs))
    first = encode_sample(_sample("A red circle."), tokenizer, "vicuna_v1", num_image_tokens=4)
    assert len(calls) == 2  # the system prompt + "USER: " before the image, then the rest
    second = encode_sample(_sample("A blue square."), tokenizer, "vicuna_v1", num_image_tokens=4)
    assert len(calls) == 3 and "USER:" not in calls[-1]  # only the new text was tokenised
    again = encode_sample(_sample("A red circle."), tokenizer, "vicuna_v1", num_image_tokens=4)
    assert (again.input_ids, again.labels) == (first.input_ids, first.labels)
    assert first.input_ids[:10] == second.input_ids[:10]

    tokenizer.add_tokens(["A chat between"])  # text of the system prompt: its run must be tokenised again
    changed = encode_sample(_sample("A red circle."), tokenizer, "vicuna_v1", num_image_tokens=4)
    assert tokenizer.convert_tokens_to_ids("A chat between") in changed.input_ids
    fresh = build_tokenizer(["What is there? A red circle.", "A blue square."], vocab_size=300)
    fresh.add_tokens(["A chat between"])
    expected = encode_sample(_sample("A red circle."), fresh, "vicuna_v1", num_image_tokens=4)
    assert (changed.input_ids, changed.labels) == (expected.input_ids, expected.labels)
