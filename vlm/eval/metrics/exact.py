"""Exact match after a light normalisation: outer spaces and periods stripped, lower case ("Red." is "red").

The normalisation `vlm eval` has always used (the demo's `eval.json` is computed with it), so numbers stay
comparable across versions. A prediction scores 1.0 when it equals any of the references.
"""

from __future__ import annotations

from typing import Sequence


def normalise(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def score(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised `prediction` equals one of the normalised `references`, else 0.0."""
    if not references:
        raise ValueError("exact match needs at least one reference answer")
    answer = normalise(prediction)
    return float(any(answer == normalise(reference) for reference in references))
