"""Answering a file of image questions (`vlm generate`, whose command line is `vlm.cli.generate`).

Two input formats, told apart by the first line (one format per file):
- vlm's: `{"id": ..., "image": "path", "question": "..."}` (`image` optional; other keys are kept); each
  output line is the same record with `"answer"` added.
- LLaVA's question files (`llava/eval/model_vqa.py`, `--question-file`): `{"question_id": ..., "image":
  "path", "text": "...", "category": ...}`; the output is LLaVA's answer file, one
  `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}` per question, with
  `prompt` the question, `text` the answer, `answer_id` a fresh unique id and `model_id` the model
  folder's name (`checkpoint-N` folders prefixed with their parent's), so LLaVA's evaluation scripts
  read it unchanged. `--num-chunks N --chunk-idx K` answer only the K-th of N equal slices, as there.
Answers come in input order. Relative image paths are resolved against `--image_folder` (default: the
input file's folder). With `--image_folder` every image must stay inside it, as training images do
(`vlm.data.paths.ImageFolder`: no `..` escape, no symlink out, an absolute path only when it lies
inside); without it, paths are relative to the input's folder and absolute ones are taken as given.

A bad line costs only itself: every record is checked and every image path resolved before the model is
loaded, and each bad line (not JSON, wrong keys, another format than the first good line's, an image
missing or outside the folder) is reported on stderr as `FILE line N (id X): reason: detail`; an image
that cannot be decoded, or a question the model cannot take (too long), is reported the same way when
its batch comes. The other lines are answered, in left-padded batches with the KV cache
(`vlm.generate.decoding`), and written to `--output` as each batch finishes (flushed), so a crash or Ctrl-C
keeps what was answered.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import IO, Any

from vlm.errors import MissingPathError

# format -> (the key holding the question, the key identifying the record)
FORMATS = {"vlm": ("question", "id"), "llava": ("text", "question_id")}


def question_format(record: Any) -> str:
    """'llava' for a LLaVA question ({question_id, text, ...}), else 'vlm' ({id, question, ...})."""
    is_llava = isinstance(record, dict) and "question_id" in record and "text" in record and "question" not in record
    return "llava" if is_llava else "vlm"


@dataclass
class BadLine:
    """One input line that was not answered: where it is, its id (if it has one), why."""

    line: int
    id: Any
    reason: str
    detail: str
    id_key: str = "id"  # the key `id` was read from: 'id' (vlm's) or 'question_id' (LLaVA's)

    def message(self, path: str) -> str:
        who = f" ({self.id_key} {self.id!r})" if self.id is not None else ""
        return f"{path} line {self.line}{who}: {self.reason}: {self.detail}"


@dataclass
class Questions:
    """A questions file read: its format and, in file order, each line's record (with `_line`, `_question`,
    `_image_path`) or its `BadLine`."""

    path: str
    format: str
    entries: list[dict[str, Any] | BadLine] = field(default_factory=list)

    @property
    def id_key(self) -> str:
        return FORMATS[self.format][1]

    @property
    def records(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if not isinstance(e, BadLine)]

    @property
    def bad(self) -> list[BadLine]:
        return [e for e in self.entries if isinstance(e, BadLine)]


def read_questions(path: str, image_folder: str | None = None) -> Questions:
    """Every line of a JSONL questions file: a record (image resolved to `_image_path`, the question under
    `_question`, its line number under `_line`) or a `BadLine`. MissingPathError when the file is missing."""
    if not os.path.isfile(path):
        raise MissingPathError(f"input file {path!r} does not exist")
    raw: list[tuple[int, Any] | BadLine] = []
    with open(path, "rb") as f:
        for number, data in enumerate(f, 1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raw.append(BadLine(number, None, "bad_json", f"not UTF-8 ({exc.reason} at byte {exc.start})"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                json.dumps(record, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) cannot be written
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, int too long, UnicodeEncodeError
                raw.append(BadLine(number, None, "bad_json", f"not valid JSON ({str(exc)[:120]})"))
                continue
            raw.append((number, record))
    # the file's format: that of its first JSON object (a broken first line does not decide it)
    first = next((r for _, r in (e for e in raw if not isinstance(e, BadLine)) if isinstance(r, dict)), None)
    questions = Questions(path, question_format(first) if first is not None else "vlm")
    resolve = _image_resolver(path, image_folder)
    for entry in raw:
        if isinstance(entry, BadLine):
            questions.entries.append(entry)
            continue
        number, record = entry
        questions.entries.append(_record(number, record, questions.format, resolve))
    return questions


def _record(number: int, record: Any, file_format: str, resolve) -> dict[str, Any] | BadLine:
    kind = question_format(record)
    text_key, id_key = FORMATS[kind]
    record_id = record.get(id_key) if isinstance(record, dict) else None
    if kind != file_format:
        return BadLine(number, record_id, "bad_schema", f"a {kind} question in a file of {file_format} questions; one "
                                                        f"format per file: {_expected(file_format)}", id_key)
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        return BadLine(number, record_id, "bad_schema", f"expected {_expected(kind)}, got {json.dumps(record)[:80]!r}",
                       id_key)
    record = {**record, "_question": record[text_key], "_line": number}
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str) or not image or "\x00" in image:
            return BadLine(number, record_id, "bad_schema", f"'image' must be a non-empty path string, got {image!r}",
                           id_key)
        try:
            record["_image_path"] = resolve(image)
        except _ImagePathError as exc:
            return BadLine(number, record_id, exc.reason, exc.detail, id_key)
    return record


class _ImagePathError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _image_resolver(path: str, image_folder: str | None):
    """image string -> path of the file to open; `_ImagePathError` when it is missing or outside the folder."""
    from vlm.data.errors import SampleError
    from vlm.data.paths import ImageFolder

    if image_folder is None:  # no folder to confine to: relative to the questions file, absolute as given
        base = os.path.dirname(os.path.abspath(path))

        def resolve(image: str) -> str:
            resolved = image if os.path.isabs(image) else os.path.join(base, image)
            if not os.path.isfile(resolved):
                raise _ImagePathError("missing_image", f"image {image!r} not found under {base!r} (the input's "
                                                       "folder; --image_folder to name another)")
            return resolved
        return resolve

    folder = ImageFolder(image_folder)

    def resolve(image: str) -> str:
        if os.path.isabs(image) and folder.root is not None:
            normal = os.path.normpath(image)
            if normal.startswith(folder.root + os.sep):  # absolute but inside the folder: checked as relative
                image = os.path.relpath(normal, folder.root)
            else:
                raise _ImagePathError("unsafe_path", f"image path {image!r} is outside --image_folder "
                                                     f"{folder.root!r}; give it relative to that folder")
        try:
            return str(folder.resolve(image))
        except SampleError as exc:
            raise _ImagePathError(exc.reason, exc.detail) from None
    return resolve


def _expected(kind: str) -> str:
    if kind == "llava":
        return "LLaVA's {'question_id', 'image', 'text'} with a 'text' string"
    return "an object with a 'question' string ({'id', 'image', 'question'}, or LLaVA's {'question_id', 'image', 'text'})"


def chunk(records: list, num_chunks: int, index: int) -> list:
    """The `index`-th of `num_chunks` slices of ceil(n / num_chunks) records (LLaVA's --num-chunks/--chunk-idx)."""
    size = math.ceil(len(records) / num_chunks) if records else 0
    return records[index * size:(index + 1) * size] if size else []


def model_id(model_path: str) -> str:
    """LLaVA's model_id: the folder's name; a `checkpoint-N` folder is named with its run's folder in front."""
    parts = os.path.expanduser(model_path).strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def answer_lines(records: list[dict[str, Any]], answers: list[str], file_format: str, model: str) -> list[dict]:
    """The output records: vlm's (the input record plus `answer`) or LLaVA's answer-file lines."""
    if file_format == "llava":
        return [{"question_id": r["question_id"], "prompt": r["text"], "text": answer, "answer_id": uuid.uuid4().hex,
                 "model_id": model_id(model), "metadata": {}} for r, answer in zip(records, answers)]
    return [{**{k: v for k, v in r.items() if not k.startswith("_")}, "answer": answer}
            for r, answer in zip(records, answers)]


def answer_file(
    generator: Any,
    questions: Questions,
    records: list[dict[str, Any]],
    out: IO[str],
    *,
    model: str,
    batch_size: int = 8,
    progress: bool = False,
    on_bad_line=None,
) -> list[BadLine]:
    """Answer `records` (from `questions`) in batches of `batch_size`, in input order, writing each batch's lines
    to `out` and flushing it before the next batch. A record whose image cannot be decoded, or that the model
    cannot take (a too-long question), is left out and returned as a `BadLine` (also passed to `on_bad_line`
    when given); the rest of its batch is answered."""
    from tqdm import tqdm

    from vlm.generate.decoding import LINE_ERRORS
    from vlm.processing import as_image

    bad: list[BadLine] = []

    def drop(record: dict[str, Any], reason: str, exc: BaseException) -> None:
        line = BadLine(record["_line"], record.get(questions.id_key), reason, str(exc), questions.id_key)
        bad.append(line)
        if on_bad_line is not None:
            on_bad_line(line)

    bar = tqdm(total=len(records), disable=not progress, desc="generating", unit="q", file=sys.stderr)
    for start in range(0, len(records), batch_size):
        batch, images = [], []
        for record in records[start:start + batch_size]:
            try:  # decoded here, one record at a time, so a bad file is charged to its own line
                images.append(None if record.get("_image_path") is None else as_image(record["_image_path"]))
                batch.append(record)
            except LINE_ERRORS as exc:
                drop(record, "unreadable_image", exc)
        answers: list[str | None]
        try:
            answers = list(generator.answer_batch([r["_question"] for r in batch], images, batch_size=len(batch) or 1))
        except LINE_ERRORS:  # one record spoils the batch (a too-long question): answer one by one to name it
            answers = []
            for record, image in zip(batch, images):
                try:
                    answers.append(generator.answer_batch([record["_question"]], [image], batch_size=1)[0])
                except LINE_ERRORS as exc:
                    answers.append(None)
                    drop(record, "bad_question", exc)
        kept = [(r, a) for r, a in zip(batch, answers) if a is not None]
        for line in answer_lines([r for r, _ in kept], [a for _, a in kept], questions.format, model):
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
        out.flush()
        bar.update(len(records[start:start + batch_size]))
    bar.close()
    return bad
