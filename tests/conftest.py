"""Shared test fixtures. Each fixture is a clearly named function; add new ones below, keep them small."""

from __future__ import annotations

import pytest

from vlm.data.tokenizer import build_tokenizer

TINY_CORPUS = [
    "What color is the circle? red green blue yellow",
    "What shape is the red object? circle square triangle",
    "How many shapes are there? 1 2 3. Is there a blue triangle? yes no",
    "Describe the picture in detail. A red circle next to a green square on a white background.",
]


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """The texts `tiny_tokenizer` is trained on."""
    return TINY_CORPUS * 4


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus):
    """A byte-level BPE tokenizer (vocab 512) with every template's special tokens and `<image>`; no Hub."""
    return build_tokenizer(tiny_corpus, vocab_size=512)


@pytest.fixture
def conversation_samples() -> dict[str, dict]:
    """Canonical samples covering the shapes encode_sample must handle, keyed by a short name."""
    return {
        "single_image": {
            "id": "single",
            "images": ["a.png"],
            "messages": [
                {"role": "user", "content": "<image>\nWhat color is the circle?"},
                {"role": "assistant", "content": "red"},
            ],
        },
        "system_two_images": {
            "id": "two",
            "images": ["a.png", "b.png"],
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "<image>\nHow many shapes are there?"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "And here? <image>"},
                {"role": "assistant", "content": "3 shapes, a red circle and two squares."},
            ],
        },
        "text_only": {
            "id": "text",
            "images": [],
            "messages": [
                {"role": "user", "content": "Is there a blue triangle?"},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "What shape is the red object?"},
                {"role": "assistant", "content": "circle"},
            ],
        },
    }
