"""Captioning metrics: BLEU-4, ROUGE-L and CIDEr-D from pycocoevalcap's own scorers (the COCO caption
evaluation), over the whole set at once (BLEU is a corpus statistic, CIDEr-D's n-gram weights come from
the set's references).

    scores = score_captions(["a dog runs on grass"], [["a dog running on the grass", "a brown dog runs"]])
    scores.values   # {"bleu4": ..., "rouge_l": ..., "cider_d": ...}; scores.tokenizer: "ptb" or "python"

Design choices:
- The scorers are pycocoevalcap's (`Bleu(4)`, `Rouge()`, `Cider()`, the last being CIDEr-D: Gaussian length
  penalty and clipped counts), called as its `COCOEvalCap` calls them, so the numbers are the COCO
  evaluation's; values are in [0, 1] for BLEU and ROUGE-L and around [0, 10] for CIDEr-D (COCO papers
  print them x100).
- Tokenisation: pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP's PTB tokenizer, lower case, punctuation
  tokens removed) needs Java. Without Java (`tokenizer="auto"`), or with `tokenizer="python"`, a Python
  approximation is used: lower case; words (with inner hyphens, periods, slashes: "dog-like", "3.5", "m/s",
  "u.s."), numbers and punctuation marks split apart; the clitics 's n't 're 've 'll 'd 'm split off and
  brackets written -lrb- ... as PTB does; PTBTokenizer's punctuation tokens removed. It agrees with PTB on
  plain captions and may differ on unusual text (URLs, abbreviations with periods); `tokenizer` says which
  one was used, and `vlm eval` writes it into metrics.json.
- pycocoevalcap is an optional dependency (`pip install 'vlm-kit[eval]'`); it is imported when captions are
  scored, and its absence is a one-line error naming the extra.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from typing import Sequence

from vlm.errors import MissingDependencyError, UserError

TOKENIZERS = ("auto", "ptb", "python")
NAMES = ("bleu4", "rouge_l", "cider_d")
# the tokens pycocoevalcap's PTBTokenizer drops after tokenising (its PUNCTUATIONS list)
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"])
_CLITIC = re.compile(r"(?i)(n't|'s|'re|'ve|'ll|'d|'m)$")
_TOKEN = re.compile(r"(?:[a-z]\.){2,}|\w+(?:[-'./&]\w+)*|\.\.\.|--|\S")
# PTBTokenizer writes brackets as -LRB- ...; with -lowerCase they come out lower-cased, so pycocoevalcap's
# punctuation list (upper case) does not remove them: kept here the same way
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-", '"': "''"}


@dataclass
class CaptionScores:
    values: dict[str, float]  # {"bleu4", "rouge_l", "cider_d"} over the set
    per_sample: list[dict[str, float]] = field(default_factory=list)  # the same per prediction (BLEU-4: its own)
    tokenizer: str = "ptb"  # "ptb" (Java PTBTokenizer) or "python"


def java_available() -> bool:
    return shutil.which("java") is not None


def resolve_tokenizer(tokenizer: str = "auto") -> str:
    """"ptb" or "python" for `tokenizer` ("auto": ptb when Java is installed); UserError for an unknown one or ptb
    without Java."""
    if tokenizer not in TOKENIZERS:
        raise UserError(f"caption tokenizer {tokenizer!r} is not one of {TOKENIZERS}")
    if tokenizer == "auto":
        return "ptb" if java_available() else "python"
    if tokenizer == "ptb" and not java_available():
        raise UserError("the PTB caption tokenizer needs Java (`java` is not on PATH); install a JRE "
                        "(e.g. apt-get install default-jre-headless) or use the Python tokenizer (--caption_tokenizer python)")
    return tokenizer


def python_tokenize(caption: str) -> str:
    """The Python approximation of PTBTokenizer + punctuation removal (module docstring)."""
    tokens: list[str] = []
    for token in _TOKEN.findall(caption.replace("\n", " ").lower()):
        clitic = _CLITIC.search(token) if len(token) > 2 else None
        if clitic and clitic.start() > 0:
            tokens += [token[:clitic.start()], clitic.group(1)]
        else:
            tokens.append(_BRACKETS.get(token, token))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def _pycocoevalcap():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise MissingDependencyError("caption metrics need pycocoevalcap: pip install 'vlm-kit[eval]' "
                                     "(or pip install pycocoevalcap)") from None
    return Bleu, Rouge, Cider, PTBTokenizer


def tokenize(captions: dict[str, list[str]], tokenizer: str) -> dict[str, list[str]]:
    """{key: [caption, ...]} -> the same with each caption tokenised ("ptb" or "python")."""
    if tokenizer == "python":
        return {key: [python_tokenize(c) for c in values] for key, values in captions.items()}
    *_, PTBTokenizer = _pycocoevalcap()
    return PTBTokenizer().tokenize({key: [{"caption": c} for c in values] for key, values in captions.items()})


def score_captions(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                   tokenizer: str = "auto") -> CaptionScores:
    """BLEU-4, ROUGE-L and CIDEr-D of `predictions[i]` against `references[i]` (several captions each)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists; need as many, >= 1")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    Bleu, Rouge, Cider, _ = _pycocoevalcap()
    used = resolve_tokenizer(tokenizer)
    keys = [str(i) for i in range(len(predictions))]
    gts = tokenize(dict(zip(keys, (list(r) for r in references))), used)
    res = tokenize({k: [p] for k, p in zip(keys, predictions)}, used)
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    values = {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider_d": float(cider)}
    per_sample = [{"bleu4": float(b), "rouge_l": float(r), "cider_d": float(c)}
                  for b, r, c in zip(bleu_each[3], rouge_each, cider_each)]
    return CaptionScores(values, per_sample, used)
