"""Evaluating a loaded model on evaluation items: answers from the one decode loop, scored by a standard metric,
with a blind baseline.

    generator = load_generator("runs/demo/model")
    items = read_items("eval.json", metric="exact", image_folder="images")
    result = evaluate(generator, items, "exact", image_folder="images", blind=True)
    write_outputs("runs/demo/eval", result, model="runs/demo/model", data_path="eval.json")

Design choices:
- Answers come from `Generator.reply_many` (the one decode loop, left-padded batches, greedy unless the
  settings sample), in chunks of `CHUNK` items so that only a chunk's images are decoded at once.
- The blind baseline runs the same model on the same questions with the images shuffled across samples (a
  derangement: no sample keeps its own image; samples are shuffled among those with the same number of
  images). A model that reads the picture scores far above it; one that learned only answer priors from
  the question text scores the same. It doubles the cost, so it is a choice (`blind`).
- Outputs (`write_outputs`): `predictions.jsonl`, one object per item: `id`, `question` (the last user turn,
  without `<image>`), `prediction`, `references`, `score` (the item's value; captions: its CIDEr-D, with all
  three in `scores`), and `blind_score` / `question_type` when there are some; `metrics.json`: `metric`,
  `scores` (the set's value(s)), `n`, `blind_scores`, `per_question_type`, `caption_tokenizer` (captions),
  and what the command adds (model, template, data_path, references, decoding settings).
- `evaluate_exact_match` is the demo's contract (DESIGN.md: `eval.json` `{"accuracy", "blind_accuracy", "n",
  "per_question_type"}`): the same pieces with the `exact` metric on LLaVA records.

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
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from vlm.data.errors import SampleError
from vlm.data.paths import ImageFolder
from vlm.errors import UserError
from vlm.eval.items import EvalItem
from vlm.eval.metrics import METRICS, caption
from vlm.eval.metrics.exact import normalise
from vlm.generate.decoding import GenerationSettings
from vlm.generate.generator import Generator

CHUNK = 256  # items whose image inputs are prepared at once (embedded images decoded)
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclass
class EvalResult:
    """What `evaluate` measured; `rows` are the lines of predictions.jsonl."""

    metric: str
    scores: dict[str, float]  # {"exact": 0.93} or the caption scores {"bleu4", "rouge_l", "cider_d"}
    n: int
    rows: list[dict]
    blind_scores: dict[str, float] | None = None
    per_question_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    caption_tokenizer: str | None = None  # "ptb" or "python" (caption only)


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2)."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    result = [0] * n
    for k, i in enumerate(order):  # each element goes to the next one in the random cycle: never to itself
        result[i] = order[(k + 1) % n]
    return result


def blind_order(items: Sequence[EvalItem], seed: int) -> list[int]:
    """For each item, the item whose images it gets in the blind pass: a derangement within each group of items
    with the same number of images (> 0); UserError when a group with images has a single item."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[len(item.images)].append(i)
    order = list(range(len(items)))
    for count, members in groups.items():
        if count == 0:
            continue
        if len(members) < 2:
            raise UserError(f"the blind baseline shuffles images across samples, but only one sample has {count} "
                            "image(s); add samples or pass --no-blind")
        for i, j in zip(members, derangement(len(members), seed)):
            order[i] = members[j]
    if all(count == 0 for count in groups):
        raise UserError("the blind baseline shuffles images across samples, but no sample has an image; pass --no-blind")
    return order


def image_input(entry: Any, folder: ImageFolder) -> Any:
    """An `images` entry as `Generator.reply_many` takes it: a file path confined to the folder (decoded by the
    decode loop), or an embedded image (bytes, a table cell: `vlm.data.embedded`) decoded by the folder's rules."""
    if isinstance(entry, str):
        return str(folder.resolve(entry))
    return folder.open(entry)


@torch.no_grad()
def answer_items(generator: Generator, items: Sequence[EvalItem], folder: ImageFolder, *,
                 image_order: Sequence[int] | None = None, batch_size: int = 8, progress: bool = False) -> list[str]:
    """The model's answer to each item, about the images of `items[image_order[i]]` (default: its own)."""
    order = list(image_order) if image_order is not None else list(range(len(items)))
    answers: list[str] = []
    for start in range(0, len(items), CHUNK):
        chunk = range(start, min(start + CHUNK, len(items)))
        try:
            images = [[image_input(entry, folder) for entry in items[order[i]].images] for i in chunk]
        except SampleError as exc:
            raise UserError(f"{exc}; fix or remove the sample (`vlm data check --check_images full` finds them all)") from None
        answers += generator.reply_many([items[i].messages for i in chunk], images, batch_size=batch_size,
                                        progress=progress)
    return answers


def score_answers(metric: str, items: Sequence[EvalItem], answers: Sequence[str], *,
                  caption_tokenizer: str = "auto") -> tuple[dict[str, float], list[float | dict[str, float]], str | None]:
    """(set-level scores, per-item scores, caption tokenizer used) of `answers` under `metric`."""
    if metric == "caption":
        scored = caption.score_captions(answers, [item.references for item in items], tokenizer=caption_tokenizer)
        return scored.values, list(scored.per_sample), scored.tokenizer
    if metric == "choice":
        from vlm.eval.metrics.choice import score as choice_score

        each = [choice_score(a, item.references, options=item.options) for a, item in zip(answers, items)]
    else:
        each = [METRICS[metric](a, item.references) for a, item in zip(answers, items)]
    return {metric: sum(each) / len(each)}, list(each), None


def evaluate(generator: Generator, items: Sequence[EvalItem], metric: str, *, image_folder: str | None = None,
             batch_size: int = 8, blind: bool = False, seed: int = 0, caption_tokenizer: str = "auto",
             progress: bool = False) -> EvalResult:
    """Answer every item with `generator`, score the answers with `metric` (and the blind answers when `blind`)."""
    if metric == "caption":
        caption.resolve_tokenizer(caption_tokenizer)  # an unusable tokenizer is an error before the answers
    folder = ImageFolder(image_folder)
    order = blind_order(items, seed) if blind else None  # refused before answering, not after
    generator.model.eval()
    answers = answer_items(generator, items, folder, batch_size=batch_size, progress=progress)
    scores, each, tokenizer = score_answers(metric, items, answers, caption_tokenizer=caption_tokenizer)
    blind_scores, blind_each = None, None
    if order is not None:
        blind_answers = answer_items(generator, items, folder, image_order=order, batch_size=batch_size,
                                     progress=progress)
        blind_scores, blind_each, _ = score_answers(metric, items, blind_answers, caption_tokenizer=caption_tokenizer)
    rows = []
    for k, (item, answer, score) in enumerate(zip(items, answers, each)):
        row = {"id": item.id, "question": item.question, "prediction": answer, "references": item.references,
               "score": score["cider_d"] if isinstance(score, dict) else score}
        if isinstance(score, dict):
            row["scores"] = score
        if blind_each is not None:
            row["blind_score"] = blind_each[k]["cider_d"] if isinstance(blind_each[k], dict) else blind_each[k]
        if item.question_type is not None:
            row["question_type"] = item.question_type
        rows.append(row)
    return EvalResult(metric, scores, len(items), rows, blind_scores, _per_question_type(rows), tokenizer)


def _per_question_type(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """{type: {"score", "blind_score"?, "n"}} for rows that carry a question_type."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if "question_type" in row:
            groups[row["question_type"]].append(row)
    result = {}
    for kind, members in sorted(groups.items()):
        entry: dict[str, Any] = {"score": sum(r["score"] for r in members) / len(members)}
        if "blind_score" in members[0]:
            entry["blind_score"] = sum(r["blind_score"] for r in members) / len(members)
        entry["n"] = len(members)
        result[kind] = entry
    return result


def metrics_record(result: EvalResult, **context: Any) -> dict[str, Any]:
    """The content of metrics.json: the metric, its value(s), n, the blind value(s), per question type, and the
    `context` given (model, template, data_path, references ...)."""
    record: dict[str, Any] = {"metric": result.metric, "scores": result.scores, "n": result.n}
    if result.blind_scores is not None:
        record["blind_scores"] = result.blind_scores
    if result.caption_tokenizer is not None:
        record["caption_tokenizer"] = {"ptb": "ptb (pycocoevalcap PTBTokenizer, Java)",
                                       "python": "python (vlm.eval.metrics.caption.python_tokenize)"}[result.caption_tokenizer]
    if result.per_question_type:
        record["per_question_type"] = result.per_question_type
    record.update(context)
    return record


def write_outputs(output_dir: str, result: EvalResult, **context: Any) -> dict[str, Any]:
    """Write `predictions.jsonl` (one row per item) and `metrics.json` into `output_dir`; return the metrics."""
    record = metrics_record(result, **context)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, PREDICTIONS_FILE), "w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(output_dir, METRICS_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------------------------------------
# The demo's contract


@torch.no_grad()
def evaluate_exact_match(model, tokenizer, image_processor, records: list[dict], image_folder: str, *,
                         template: str, batch_size: int = 64, seed: int = 0,
                         max_new_tokens: int = 8) -> dict[str, Any]:
    """`{"accuracy", "blind_accuracy", "n", "per_question_type": {type: {"accuracy", "blind_accuracy", "n"}},
    "examples"}` (DESIGN.md's demo contract).

    `records` are LLaVA JSON records with one image, one question and one answer (`question_type` optional).
    Answers are greedy, `max_new_tokens` at most, decoded by the one loop (`Generator.reply_many`).
    """
    from vlm.folders.load import context_length

    items = [EvalItem(str(r.get("id", i)), [{"role": "user", "content": r["conversations"][0]["value"]}], [r["image"]],
                      [r["conversations"][1]["value"]], question_type=r.get("question_type", "all"))
             for i, r in enumerate(records)]
    generator = Generator(model, tokenizer, image_processor, template, context_length(model, tokenizer),
                          GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens))
    result = evaluate(generator, items, "exact", image_folder=image_folder, batch_size=batch_size, blind=True,
                      seed=seed)
    return {
        "accuracy": result.scores["exact"],
        "blind_accuracy": result.blind_scores["exact"],
        "n": result.n,
        "per_question_type": {kind: {"accuracy": v["score"], "blind_accuracy": v["blind_score"], "n": v["n"]}
                              for kind, v in result.per_question_type.items()},
        "examples": [{"question": item.messages[0]["content"], "target": normalise(item.references[0]),
                      "answer": normalise(row["prediction"])} for item, row in list(zip(items, result.rows))[:10]],
    }


__all__ = ["EvalResult", "blind_order", "derangement", "evaluate", "evaluate_exact_match", "metrics_record",
           "normalise", "write_outputs"]
