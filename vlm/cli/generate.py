"""`vlm generate --model PATH --input questions.jsonl --output answers.jsonl`: answer a file of image questions.

The formats (vlm's questions, LLaVA's question and answer files), image paths and bad lines are described in
`vlm.generate.batch`, which does the work. A bad line costs only itself: it is reported on stderr as
`FILE line N (id X): reason: detail` and the other lines are answered. Exit status: 0 every line answered;
1 some lines bad (the rest answered, a summary line counts them by reason); 2 a mistake that stops the
command before answering (a bad flag, a missing input file, a model folder that cannot be loaded).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from vlm.generate.batch import BadLine, answer_file, chunk, read_questions


def main(argv: list[str] | None = None) -> int:
    from vlm.cli.options import add_decoding_arguments, add_model_arguments, generator_from_args

    parser = argparse.ArgumentParser(prog="vlm generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--input", "--question-file", "--question_file", dest="input", required=True,
                        help="JSONL of {id, image, question}, or LLaVA's question file {question_id, image, text}")
    parser.add_argument("--output", "--answers-file", "--answers_file", dest="output", required=True,
                        help="JSONL to write: each record with 'answer' added, or LLaVA's answer file for LLaVA's "
                             "questions; written as answers come")
    parser.add_argument("--num-chunks", "--num_chunks", dest="num_chunks", type=int, default=1,
                        help="split the questions into this many equal slices (LLaVA's; default 1)")
    parser.add_argument("--chunk-idx", "--chunk_idx", dest="chunk_idx", type=int, default=0,
                        help="answer only this slice, 0-based (LLaVA's; default 0)")
    parser.add_argument("--image_folder", "--image-folder", dest="image_folder", default=None,
                        help="folder image paths are relative to; images must stay inside it (default: the input's "
                             "folder, unconfined)")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8,
                        help="questions decoded together (default 8)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_decoding_arguments(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be >= 1")
    if not 0 <= args.chunk_idx < args.num_chunks:
        parser.error(f"--chunk-idx {args.chunk_idx} with --num-chunks {args.num_chunks}: expected 0 <= index < chunks")
    questions = read_questions(args.input, args.image_folder)
    # slices are taken over every line, good or bad, so --chunk-idx K names the same lines whatever is broken
    mine = chunk(questions.entries, args.num_chunks, args.chunk_idx)
    records = [e for e in mine if not isinstance(e, BadLine)]
    bad = [e for e in mine if isinstance(e, BadLine)]

    def report(line: BadLine) -> None:
        print(f"vlm generate: skipped {line.message(args.input)}", file=sys.stderr, flush=True)

    for line in bad:  # before the model loads: seconds, not an hour
        report(line)
    written = 0
    if records:
        generator = generator_from_args(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as out:
            late = answer_file(generator, questions, records, out, model=args.model, batch_size=args.batch_size,
                               progress=args.progress, on_bad_line=report)
        bad += late
        written = len(records) - len(late)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        open(args.output, "w", encoding="utf-8").close()
    kind = "LLaVA answer-file lines" if questions.format == "llava" else "answers"
    if not bad:
        print(f"{written} {kind} written to {args.output}", file=sys.stderr)
        return 0
    reasons = ", ".join(f"{r}={n}" for r, n in Counter(b.reason for b in bad).items())
    lines = ", ".join(str(b.line) for b in sorted(bad, key=lambda b: b.line)[:10]) + (", ..." if len(bad) > 10 else "")
    print(f"vlm generate: {written} {kind} written to {args.output}; {len(bad)} bad line(s) skipped ({reasons}; "
          f"lines {lines}); fix them and rerun those lines", file=sys.stderr)
    return 1
