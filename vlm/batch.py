"""`vlm generate --model PATH --input questions.jsonl --output answers.jsonl`: answer a file of image questions.

Each input line is `{"id": ..., "image": "path", "question": "..."}` (`image` optional; other keys are
kept); each output line is the same record with `"answer"` added, in input order. Relative image paths
are resolved against `--image_folder` (default: the input file's folder). Every record is checked and
every image path resolved before the model is loaded, so a bad line fails in seconds, not after an
hour of decoding. Answers are decoded in left-padded batches with the KV cache (`vlm.generate`); the
output file is written at the end, through a temporary file, so it is never half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def read_questions(path: str, image_folder: str | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file with their images resolved; ValueError/FileNotFoundError naming the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: not JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise ValueError(f"{path} line {number}: expected an object with a 'question' string, got {line.strip()[:80]!r}")
            image = record.get("image")
            if image is not None:
                resolved = image if os.path.isabs(image) else os.path.join(folder, image)
                if not os.path.isfile(resolved):
                    raise FileNotFoundError(
                        f"{path} line {number} (id {record.get('id')!r}): image {image!r} not found under "
                        f"--image_folder {folder!r}"
                    )
                record = {**record, "_image_path": resolved}
            records.append(record)
    return records


def write_answers(path: str, records: list[dict[str, Any]], answers: list[str]) -> None:
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for record, answer in zip(records, answers):
            out = {k: v for k, v in record.items() if k != "_image_path"}
            f.write(json.dumps({**out, "answer": answer}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from vlm.generate import USER_ERRORS, add_decoding_arguments, add_model_arguments, generator_from_args

    parser = argparse.ArgumentParser(prog="vlm generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--input", "--question-file", "--question_file", dest="input", required=True,
                        help="JSONL of {id, image, question}")
    parser.add_argument("--output", "--answers-file", "--answers_file", dest="output", required=True,
                        help="JSONL to write, each record with 'answer' added")
    parser.add_argument("--image_folder", "--image-folder", dest="image_folder", default=None,
                        help="folder relative image paths are resolved against (default: the input's folder)")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8,
                        help="questions decoded together (default 8)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_decoding_arguments(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be >= 1")
    try:
        records = read_questions(args.input, args.image_folder)
        generator = generator_from_args(args)
        answers = generator.answer_batch([r["question"] for r in records], [r.get("_image_path") for r in records],
                                         batch_size=args.batch_size, progress=args.progress)
    except USER_ERRORS as exc:
        print(f"vlm generate: error: {exc}", file=sys.stderr)
        return 1
    write_answers(args.output, records, answers)
    print(f"{len(records)} answers written to {args.output}", file=sys.stderr)
    return 0
