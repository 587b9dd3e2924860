"""ChartQA relaxed accuracy: a numeric answer within 5% of the reference, anything else equal to it.

The rule of the ChartQA paper (Masry et al. 2022, section 5.1, after Methani et al. 2020), as pix2struct's
`metrics.relaxed_correctness` computes it (the function lmms-eval and Qwen-VL copy):
- a text ending in "%" is that number / 100 ("96%" is 0.96), any other text is a number when Python's
  `float` reads it;
- when both are numbers and the reference is not zero: correct when |prediction - reference| / |reference|
  <= 0.05;
- otherwise (text, or a zero reference): correct when both are equal ignoring case.
With several references a prediction scores the best of them (pix2struct's `aggregate_metrics`). Outer
whitespace is stripped first (Qwen-VL's evaluation strips the model's answer); nothing else is changed, so
"12" and "12." or "Yes" and "Yes, it is" differ, as they do in the published numbers.
"""

from __future__ import annotations

from typing import Sequence

MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, reference: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """Whether `prediction` is `reference` within `max_relative_change` (numbers) or ignoring case (text)."""
    prediction, reference = prediction.strip(), reference.strip()
    predicted, target = _to_float(prediction), _to_float(reference)
    if predicted is not None and target:
        return abs(predicted - target) / abs(target) <= max_relative_change
    return prediction.lower() == reference.lower()


def score(prediction: str, references: Sequence[str]) -> float:
    """1.0 when `prediction` is relaxed-correct for any of `references`, else 0.0."""
    if not references:
        raise ValueError("relaxed accuracy needs at least one reference answer")
    return float(any(relaxed_correctness(prediction, reference) for reference in references))
