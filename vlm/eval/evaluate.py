"""Exact-match evaluation of a VLM on LLaVA-style question/answer samples, with a blind baseline.

The blind baseline runs the same model on the same questions with the images shuffled across samples
(a derangement: no sample keeps its own image). A model that reads the picture scores far above it;
one that learned only answer priors from the question text scores the same.

    vlm eval --model runs/demo/model --data_path data/eval.json --image_folder data/images   (vlm.cli.eval)

The chat template is the one the model folder records (`vlm.generate.prompts.choose_template`); `--template`
names another, which is an error when it prompts differently from the recorded one unless
`--force-template`: a score measured in the wrong format (6% instead of 97%) looks like a bad model,
not like a wrong flag, and is reported and compared long after any warning has scrolled away.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from typing import Any

import torch

from vlm.data.errors import SampleError
from vlm.data.paths import ImageFolder
from vlm.errors import MissingPathError, UserError
from vlm.generate.decoding import GenerationSettings
from vlm.generate.generator import Generator


def normalise(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2)."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    return order[1:] + order[:1]  # a cyclic shift of a random order fixes no element


@torch.no_grad()
def evaluate_exact_match(model, tokenizer, image_processor, records: list[dict], image_folder: str, *,
                         template: str, batch_size: int = 64, seed: int = 0,
                         max_new_tokens: int = 8) -> dict[str, Any]:
    """`{"accuracy", "blind_accuracy", "n", "per_question_type": {type: {"accuracy", "blind_accuracy", "n"}}}`.

    `records` are LLaVA JSON records with one image, one question and one answer (`question_type` optional).
    Answers are greedy, `max_new_tokens` at most, decoded by the one loop (`Generator.reply_many`).
    """
    from vlm.folders.load import context_length

    folder = ImageFolder(image_folder)
    questions, images, targets, types = [], [], [], []
    for record in records:
        turns = record["conversations"]
        questions.append([{"role": "user", "content": turns[0]["value"]}])
        images.append([folder.open(record["image"])])
        targets.append(normalise(turns[1]["value"]))
        types.append(record.get("question_type", "all"))
    model.eval()
    generator = Generator(model, tokenizer, image_processor, template, context_length(model, tokenizer),
                          GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens))
    predicted = generator.reply_many(questions, images, batch_size=batch_size)
    shuffled = [images[j] for j in derangement(len(images), seed)]
    blind = generator.reply_many(questions, shuffled, batch_size=batch_size)
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
    `image_folder`); UserError naming the file, the first bad record's index and id, and how many are bad."""
    if not os.path.isfile(path):
        raise MissingPathError(f"--data_path {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"--data_path {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--data_path {path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"--data_path {path}: expected a non-empty JSON list of LLaVA records")
    folder = ImageFolder(image_folder)
    bad = [(i, problem) for i, record in enumerate(records) if (problem := _record_problem(record, folder))]
    if bad:
        index, problem = bad[0]
        record = records[index]
        sample_id = record.get("id") if isinstance(record, dict) else None
        more = f" ({len(bad) - 1} more bad record(s))" if len(bad) > 1 else ""
        raise UserError(f"--data_path {path} record {index} (0-based, id {sample_id!r}): {problem}{more}; fix or remove it "
                         "(`vlm data check` lists them all)")
    return records
