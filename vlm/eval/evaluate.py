"""Exact-match evaluation of a VLM on LLaVA-style question/answer samples, with a blind baseline.

The blind baseline runs the same model on the same questions with the images shuffled across samples
(a derangement: no sample keeps its own image). A model that reads the picture scores far above it;
one that learned only answer priors from the question text scores the same.

    vlm eval --model runs/demo/model --data_path data/eval.json --image_folder data/images

The chat template is the one the model folder records (`vlm.generate.generator.default_template`); `--template`
names another, which is an error when it prompts differently from the recorded one unless
`--force-template`: a score measured in the wrong format (6% instead of 97%) looks like a bad model,
not like a wrong flag, and is reported and compared long after any warning has scrolled away.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import sys
from collections import defaultdict
from typing import Any

import torch

from vlm.data.errors import SampleError
from vlm.data.paths import ImageFolder
from vlm.generate.generator import (
    USER_ERRORS,
    GenerationSettings,
    build_prompt,
    check_template,
    decode,
    default_template,
    generate_ids,
    pad_id,
    stop_token_ids,
)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def normalise(text: str) -> str:
    return text.strip().strip(".").strip().lower()


@torch.no_grad()
def greedy_answers(model, tokenizer, image_processor, questions: list[list[dict]], images: list[list],
                   *, template: str, max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
    """Greedy answers for conversations (messages up to the last user turn) with their PIL images."""
    settings = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens)
    stops = stop_token_ids(tokenizer, template)
    num_image_tokens = model.vlm_config.num_image_tokens
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        batch_images = images[start:start + batch_size]
        prompts = [build_prompt(q, tokenizer, template, num_image_tokens=num_image_tokens, num_images=len(ims))
                   for q, ims in zip(questions[start:start + batch_size], batch_images)]
        flat = [im for sample in batch_images for im in sample]
        pixel_values = image_processor(flat, return_tensors="pt")["pixel_values"] if flat else None
        new_ids = generate_ids(model, prompts, pixel_values, stop_ids=stops, pad_token_id=pad_id(tokenizer),
                               settings=settings)
        answers += [decode(tokenizer, ids) for ids in new_ids]
    return answers


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2)."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    return order[1:] + order[:1]  # a cyclic shift of a random order fixes no element


def evaluate_exact_match(model, tokenizer, image_processor, records: list[dict], image_folder: str, *,
                         template: str, batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """`{"accuracy", "blind_accuracy", "n", "per_question_type": {type: {"accuracy", "blind_accuracy", "n"}}}`.

    `records` are LLaVA JSON records with one image, one question and one answer (`question_type` optional).
    """
    folder = ImageFolder(image_folder)
    questions, images, targets, types = [], [], [], []
    for record in records:
        turns = record["conversations"]
        questions.append([{"role": "user", "content": turns[0]["value"]}])
        images.append([folder.open(record["image"])])
        targets.append(normalise(turns[1]["value"]))
        types.append(record.get("question_type", "all"))
    model.eval()
    predicted = greedy_answers(model, tokenizer, image_processor, questions, images, template=template,
                               batch_size=batch_size)
    shuffled = [images[j] for j in derangement(len(images), seed)]
    blind = greedy_answers(model, tokenizer, image_processor, questions, shuffled, template=template,
                           batch_size=batch_size)
    per_type: dict[str, dict[str, float]] = defaultdict(lambda: {"correct": 0, "blind_correct": 0, "n": 0})
    for target, answer, blind_answer, kind in zip(targets, predicted, blind, types):
        per_type[kind]["n"] += 1
        per_type[kind]["correct"] += normalise(answer) == target
        per_type[kind]["blind_correct"] += normalise(blind_answer) == target
    n = len(targets)
    return {
        "accuracy": sum(v["correct"] for v in per_type.values()) / n,
        "blind_accuracy": sum(v["blind_correct"] for v in per_type.values()) / n,
        "n": n,
        "per_question_type": {
            kind: {"accuracy": v["correct"] / v["n"], "blind_accuracy": v["blind_correct"] / v["n"], "n": v["n"]}
            for kind, v in sorted(per_type.items())
        },
        "examples": [{"question": q[0]["content"], "target": t, "answer": normalise(a)}
                     for q, t, a in list(zip(questions, targets, predicted))[:10]],
    }


def _record_problem(record: Any, folder: ImageFolder) -> str | None:
    """Why `record` cannot be evaluated (one image, a question and an answer), or None."""
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return "no 'conversations' list with a question and an answer"
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
        return "the first two 'conversations' turns need a 'value' string (question, answer)"
    if not isinstance(record.get("image"), str):
        return f"'image' must be a relative path string, got {record.get('image')!r}"
    try:
        folder.resolve(record["image"])
    except SampleError as exc:
        return str(exc)
    return None


def read_eval_records(path: str, image_folder: str) -> list[dict]:
    """The records of a LLaVA JSON evaluation set, each checked (question, answer, an image inside
    `image_folder`); ValueError naming the file, the first bad record's index and id, and how many are bad."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data_path {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--data_path {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--data_path {path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"--data_path {path}: expected a non-empty JSON list of LLaVA records")
    folder = ImageFolder(image_folder)
    bad = [(i, problem) for i, record in enumerate(records) if (problem := _record_problem(record, folder))]
    if bad:
        index, problem = bad[0]
        record = records[index]
        sample_id = record.get("id") if isinstance(record, dict) else None
        more = f" ({len(bad) - 1} more bad record(s))" if len(bad) > 1 else ""
        raise ValueError(f"--data_path {path} record {index} (0-based, id {sample_id!r}): {problem}{more}; fix or remove it "
                         "(`vlm data check` lists them all)")
    return records


def main(argv: list[str] | None = None) -> int:
    from vlm.hub import add_trust_remote_code_argument

    parser = argparse.ArgumentParser(prog="vlm eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="vlm model folder")
    parser.add_argument("--data_path", required=True, help="LLaVA JSON with one question and answer per record")
    parser.add_argument("--image_folder", required=True)
    parser.add_argument("--template", default=None,
                        help="chat template (default: the one the model folder records it was trained with; another "
                             "one is an error unless --force-template)")
    parser.add_argument("--force-template", "--force_template", dest="force_template", action="store_true",
                        help="use --template even when the model folder records another template")
    parser.add_argument("--batch_size", type=int, default=64)
    add_trust_remote_code_argument(parser)
    parser.add_argument("--output", help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be >= 1")
    import vlm
    from vlm.hub import auto_tokenizer
    from vlm.visual.processor import ImageProcessor

    try:
        tokenizer = auto_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        if args.template is None:
            template = default_template(args.model, tokenizer)
        else:
            check_template(args.model, args.template, tokenizer, force=args.force_template, flag="--template")
            template = args.template
        records = read_eval_records(args.data_path, args.image_folder)
    except USER_ERRORS as exc:  # before the model is loaded: a wrong flag or record costs seconds, not an evaluation
        print(f"vlm eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"template: {template!r}", file=sys.stderr)
    try:
        model = vlm.from_pretrained(args.model)
        processor = ImageProcessor.from_pretrained(args.model)
    except USER_ERRORS as exc:
        print(f"vlm eval: error: {exc}", file=sys.stderr)
        return 2
    result = evaluate_exact_match(model, tokenizer, processor, records, args.image_folder, template=template,
                                  batch_size=args.batch_size)
    text = json.dumps(result, indent=2)
    print(text)  # first: a full disk or a bad --output must not cost the evaluation
    print(f"accuracy={result['accuracy']:.4f} blind_accuracy={result['blind_accuracy']:.4f}")
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:
            reason = "no space left on device" if exc.errno in DISK_FULL else (exc.strerror or str(exc))
            print(f"vlm eval: error: {reason} writing --output {args.output!r}; the result is printed above: free "
                  "space or choose another --output", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
