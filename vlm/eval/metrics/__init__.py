"""The evaluation metrics, one module each, and the one table that names them.

    from vlm.eval.metrics import METRICS, corpus_scores
    METRICS["vqa"]("Two", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"])   # 0.9 (per answer)
    corpus_scores("exact", predictions, references)                             # {"exact": mean}
    corpus_scores("caption", predictions, references)                           # {"bleu4", "rouge_l", "cider_d"}

- `METRICS`: name -> `score(prediction: str, references: list[str]) -> float` in [0, 1], for the metrics that
  score each answer on its own: `vqa` (official VQA accuracy), `chartqa` (relaxed accuracy), `choice`
  (option letter, MMBench style; also takes `options={letter: text}`), `exact` (normalised exact match).
  A set's value is the mean.
- `caption` is scored over the whole set (`corpus_scores`, or `caption.score_captions` for per-sample
  values too): BLEU-4, ROUGE-L, CIDEr-D from pycocoevalcap.
- `METRIC_NAMES`: every name `vlm eval --metric` takes.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from vlm.errors import ConfigError
from vlm.eval.metrics import caption, chartqa, choice, exact, vqa

METRICS: dict[str, Callable[..., float]] = {
    "vqa": vqa.score,
    "chartqa": chartqa.score,
    "choice": choice.score,
    "exact": exact.score,
}
CORPUS_METRICS = ("caption",)
METRIC_NAMES: tuple[str, ...] = (*METRICS, *CORPUS_METRICS)


def check_metric(name: str, flag: str = "--metric") -> str:
    """`name` when it is a metric; ConfigError naming the known ones otherwise."""
    if name not in METRIC_NAMES:
        raise ConfigError(f"{flag} {name!r} is not a metric; use one of {', '.join(METRIC_NAMES)}")
    return name


def corpus_scores(name: str, predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                  options: Sequence[Mapping[str, str] | None] | None = None,
                  caption_tokenizer: str = "auto") -> dict[str, float]:
    """The set-level value(s) of metric `name`: {name: mean score} for per-answer metrics, the three caption
    scores for `caption`. `options[i]` are sample i's choices (`choice` only)."""
    check_metric(name)
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists; need as many, >= 1")
    if name == "caption":
        return caption.score_captions(predictions, references, tokenizer=caption_tokenizer).values
    if name == "choice":
        per_item = options or [None] * len(predictions)
        values = [choice.score(p, r, options=o) for p, r, o in zip(predictions, references, per_item)]
    else:
        values = [METRICS[name](p, r) for p, r in zip(predictions, references)]
    return {name: sum(values) / len(values)}


__all__ = ["CORPUS_METRICS", "METRICS", "METRIC_NAMES", "check_metric", "corpus_scores"]
