"""RLAIF-V-style preference tables: one row per (image, question) with a chosen and a rejected answer.

    image | question | chosen | rejected | ds_name | origin_dataset | idx | image_path ...

(openbmb/RLAIF-V-Dataset's columns; Parquet on the hub, or any table, JSON Lines or CSV). A row becomes
the user message `<image>\\n{question}` (no second `<image>` when the question has one; no image for an
empty image cell) and the two answers; the id is `id`, else `idx`, else `<file>:<row>`; the other scalar
columns go into `meta`. The image cell is a table's embedded image, or a path under --image_folder.
"""

from __future__ import annotations

from typing import Any, Iterator

from vlm.data.errors import SampleError
from vlm.data.formats.common import IMAGE, bad, extra_fields, image_list, record_id
from vlm.data.formats.preference import preference_sample
from vlm.data.formats.source import SourceFile

NAME = "rlaif_v"
_COLUMNS = ("image", "question", "chosen", "rejected")


def detect(src: SourceFile, **options: Any) -> bool:
    first = src.first
    return (src.kind in ("array", "lines", "csv", "table") and isinstance(first, dict)
            and all(k in first for k in ("question", "chosen", "rejected")))


def read(src: SourceFile, *, system: str | None = None) -> Iterator[dict | SampleError]:
    for index, row in enumerate(src.records()):
        yield row if isinstance(row, SampleError) else rlaif_v_row(row, src, index, system)


def rlaif_v_row(row: Any, src: SourceFile, index: int, system: str | None = None) -> dict | SampleError:
    if not isinstance(row, dict):
        return bad(f"expected an object, got {type(row).__name__}", src.path, index)
    sample_id = record_id(row.get("id", row.get("idx")), src.path, index)
    wrong = next((f"'{k}' must be a string, got {row.get(k)!r:.80}" for k in _COLUMNS[1:]
                  if not isinstance(row.get(k), str)), None)
    try:
        images = image_list(row.get("image"))
    except TypeError as e:
        wrong = wrong or str(e)
    if wrong:
        return bad(wrong, src.path, index, sample_id)
    question = row["question"]
    if images and IMAGE not in question:
        question = f"{IMAGE}\n" * len(images) + question
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    meta = extra_fields(row, ("id", "idx", *_COLUMNS))
    return preference_sample(sample_id, images, messages, row["chosen"], row["rejected"], meta)
