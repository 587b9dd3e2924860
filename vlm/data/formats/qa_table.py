"""Question/answer tables, ChartQA style: one row per question about an image (CSV, JSON Lines or JSON).

Row: image column (default `image`, or ChartQA's `imgname` when `image` is absent), question column
(default `query`), answer column (default `label`), optional id column (default `id`). All names are
configurable. A row becomes user `<image>\\n{question}` (no second `<image>` when the question has one)
-> assistant `{answer}`, after an optional
`system` message; a row with an empty image cell is a text-only sample. Numbers in JSON answers are
written as text, and a list holding one answer (ChartQA on the hub: `label: ["14"]`) is that answer;
anything else that is not a string is `bad_schema`. In a Parquet/Arrow table (`vlm.data.formats.table`) the
image column may hold the embedded image itself (the `datasets` Image feature), read lazily from the file.
"""

from __future__ import annotations

from typing import Any, Iterator

from vlm.data.embedded import EmbeddedImage
from vlm.data.errors import SampleError
from vlm.data.formats.common import IMAGE, bad, extra_fields, make_sample, record_id
from vlm.data.formats.source import SourceFile

NAME = "qa_table"
_IMAGE_COLUMNS = ("image", "imgname")


def detect(src: SourceFile, *, question_column: str = "query", answer_column: str = "label", **options: Any) -> bool:
    first = src.first
    if src.kind not in ("array", "lines", "csv", "table") or not isinstance(first, dict):
        return False
    return question_column in first and answer_column in first


def read(
    src: SourceFile,
    *,
    image_column: str | None = None,
    question_column: str = "query",
    answer_column: str = "label",
    id_column: str = "id",
    system: str | None = None,
) -> Iterator[dict | SampleError]:
    for index, row in enumerate(src.records()):
        if isinstance(row, SampleError):
            yield row
            continue
        if not isinstance(row, dict):
            yield bad(f"expected an object, got {type(row).__name__}", src.path, index)
            continue
        sample_id = record_id(row.get(id_column), src.path, index)
        column = image_column or next((c for c in _IMAGE_COLUMNS if c in row), _IMAGE_COLUMNS[0])
        image = row.get(column) or ""
        question, answer = row.get(question_column), row.get(answer_column)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        problem = next(
            (
                f"'{name}' must be a string, got {value!r:.80}"
                for name, value in ((column, image), (question_column, question), (answer_column, answer))
                if not isinstance(value, str) and not (name == column and isinstance(value, EmbeddedImage))
            ),
            None,
        )
        if problem:
            yield bad(problem, src.path, index, sample_id)
            continue
        messages = [{"role": "system", "content": system}] if system else []
        add_placeholder = image and IMAGE not in question
        messages.append({"role": "user", "content": f"{IMAGE}\n{question}" if add_placeholder else question})
        messages.append({"role": "assistant", "content": answer})
        used = (id_column, column, question_column, answer_column)
        yield make_sample(sample_id, [image] if image else [], messages, extra_fields(row, used))
