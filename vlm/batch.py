"""`vlm generate --model PATH --input questions.jsonl --output answers.jsonl`: answer a file of image questions.

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
input file's folder). Every record is checked and every image path resolved before the model is
loaded, so a bad line fails in seconds, not after an hour of decoding. Answers are decoded in
left-padded batches with the KV cache (`vlm.generate`); the output file is written at the end, through
a temporary file, so it is never half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from typing import Any

# format -> (the key holding the question, the key identifying the record)
FORMATS = {"vlm": ("question", "id"), "llava": ("text", "question_id")}


def question_format(record: Any) -> str:
    """'llava' for a LLaVA question ({question_id, text, ...}), else 'vlm' ({id, question, ...})."""
    is_llava = isinstance(record, dict) and "question_id" in record and "text" in record and "question" not in record
    return "llava" if is_llava else "vlm"


def read_questions(path: str, image_folder: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(format, records) of a JSONL file, images resolved (`_image_path`) and the question under `_question`;
    ValueError/FileNotFoundError naming the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    records: list[dict[str, Any]] = []
    file_format = None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: not JSON ({exc})") from None
            kind = question_format(record)
            if file_format is None:
                file_format = kind
            elif kind != file_format:
                raise ValueError(f"{path} line {number}: a {kind} question in a file of {file_format} questions "
                                 f"(line 1's format); one format per file: {_expected(file_format)}")
            text_key, id_key = FORMATS[kind]
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(f"{path} line {number}: expected {_expected(kind)}, got {line.strip()[:80]!r}")
            record = {**record, "_question": record[text_key]}
            image = record.get("image")
            if image is not None:
                resolved = image if os.path.isabs(image) else os.path.join(folder, image)
                if not os.path.isfile(resolved):
                    raise FileNotFoundError(
                        f"{path} line {number} ({id_key} {record.get(id_key)!r}): image {image!r} not found under "
                        f"--image_folder {folder!r}"
                    )
                record["_image_path"] = resolved
            records.append(record)
    return file_format or "vlm", records


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


def write_answers(path: str, lines: list[dict[str, Any]]) -> None:
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from vlm.generate import USER_ERRORS, add_decoding_arguments, add_model_arguments, generator_from_args

    parser = argparse.ArgumentParser(prog="vlm generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--input", "--question-file", "--question_file", dest="input", required=True,
                        help="JSONL of {id, image, question}, or LLaVA's question file {question_id, image, text}")
    parser.add_argument("--output", "--answers-file", "--answers_file", dest="output", required=True,
                        help="JSONL to write: each record with 'answer' added, or LLaVA's answer file for LLaVA's "
                             "questions")
    parser.add_argument("--num-chunks", "--num_chunks", dest="num_chunks", type=int, default=1,
                        help="split the questions into this many equal slices (LLaVA's; default 1)")
    parser.add_argument("--chunk-idx", "--chunk_idx", dest="chunk_idx", type=int, default=0,
                        help="answer only this slice, 0-based (LLaVA's; default 0)")
    parser.add_argument("--image_folder", "--image-folder", dest="image_folder", default=None,
                        help="folder relative image paths are resolved against (default: the input's folder)")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8,
                        help="questions decoded together (default 8)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_decoding_arguments(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be >= 1")
    if not 0 <= args.chunk_idx < args.num_chunks:
        parser.error(f"--chunk-idx {args.chunk_idx} with --num-chunks {args.num_chunks}: expected 0 <= index < chunks")
    try:
        file_format, records = read_questions(args.input, args.image_folder)
        records = chunk(records, args.num_chunks, args.chunk_idx)
        generator = generator_from_args(args)
        answers = generator.answer_batch([r["_question"] for r in records], [r.get("_image_path") for r in records],
                                         batch_size=args.batch_size, progress=args.progress)
    except USER_ERRORS as exc:
        print(f"vlm generate: error: {exc}", file=sys.stderr)
        return 1
    write_answers(args.output, answer_lines(records, answers, file_format, args.model))
    kind = "LLaVA answer-file lines" if file_format == "llava" else "answers"
    print(f"{len(records)} {kind} written to {args.output}", file=sys.stderr)
    return 0
