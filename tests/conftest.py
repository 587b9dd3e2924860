"""Shared test fixtures. Each fixture is a clearly named function; add new ones below, keep them small."""

from __future__ import annotations

import os

import pytest

from vlm.data.tokenizer import build_tokenizer

# torch threads for the tests: tiny models run fastest on one thread, and a busy machine then slows the
# suite in proportion instead of 5-25x (bench/RESULTS.md). VLM_TEST_THREADS=N measures another count.
TEST_THREADS_ENV = "VLM_TEST_THREADS"
DEFAULT_TEST_THREADS = 1


def pytest_configure(config):
    import torch

    threads = int(os.environ.get(TEST_THREADS_ENV, DEFAULT_TEST_THREADS))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the scripts tests start as subprocesses
    # Parquet image tables are copied to Arrow once (vlm.data.formats.table): into the run's temporary folder,
    # never the user's ~/.cache, unless the caller chose a cache.
    if "VLM_TABLE_CACHE" not in os.environ:
        import shutil
        import tempfile

        os.environ["VLM_TABLE_CACHE"] = cache = tempfile.mkdtemp(prefix="vlm-test-tables-")
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))


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


# --- data readers/checks fixtures (tests/test_formats.py, test_check.py, test_dataset.py, test_data_cli.py)


@pytest.fixture
def data_image_folder(tmp_path):
    """An image folder: `ok.png`, `sub/ok2.png` (8x8 RGB), `corrupt.png` (not an image), `truncated.png` (cut short)."""
    import io

    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "ok.png")
    Image.new("RGB", (12, 6), "blue").save(folder / "sub" / "ok2.png")
    (folder / "corrupt.png").write_bytes(b"this is not a png at all")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return folder


@pytest.fixture
def write_data(tmp_path):
    """`write_data(name, records)`: write JSON (or JSON Lines for *.jsonl, raw text for str) under tmp_path; return the path."""
    import json

    def write(name: str, records):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(records, str):
            path.write_text(records, encoding="utf-8")
        elif name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        else:
            path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
        return path

    return write


def llava_record(record_id: str, question: str = "<image>\nWhat color is the circle?", answer: str = "red", image="ok.png", **extra) -> dict:
    """A LLaVA-format record (`image=None` for text-only)."""
    record = {"id": record_id}
    if image is not None:
        record["image"] = image
    record["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record.update(extra)
    return record


@pytest.fixture
def make_llava_record():
    """`make_llava_record(id, question=..., answer=..., image="ok.png", **extra)` -> a LLaVA record."""
    return llava_record
