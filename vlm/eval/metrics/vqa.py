"""VQA accuracy as the official VQA evaluation computes it (GT-Vision-Lab/VQA,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`, the Python 3 version on master).

    score("Two", ["2"] * 3 + ["3"] * 7)   # 0.9: three annotators said "2"

The rules, in the official order:
- The prediction: newlines and tabs become spaces, outer spaces go; punctuation (`process_punctuation`),
  then lower case, number words zero..ten -> digits ("none" -> "0"), articles a/an/the dropped,
  contractions written without the apostrophe restored ("dont" -> "don't") (`process_digit_article`).
- The references (the annotators' answers): only punctuation is processed, and only when they are not all
  the same. The official annotation files are already normalised (lower case, digits); references written
  otherwise ("Two") are compared as written, as the official script does.
- Accuracy: for each annotator, min(1, #other annotators whose answer equals the prediction / 3); the
  question's accuracy is the mean over annotators (the 10-choose-9 subsets for VQA's ten answers), so 3
  matching annotators of 10 give 0.9, 2 give 0.6, 1 gives 0.3, 4 or more give 1.0.

Quirks kept on purpose, because a number that differs from the official one is not VQA accuracy:
- a punctuation mark is removed without a space when the text has it next to a space (or has a digit,
  digit pattern such as "1,000" anywhere), otherwise it becomes a space;
- the period pattern `(?!<=\\d)(\\.)(?!\\d)` is a lookahead, not a lookbehind: every "." not followed by a
  digit goes ("dog." -> "dog", "2.5" stays), at most 32 of them (the script passes `re.UNICODE`, 32, where
  `re.sub` takes its count);
- the contraction table is the official one, including its odd entries ("somebody'd" -> "somebodyd").
"""

from __future__ import annotations

import re
from typing import Sequence

# Contracted forms of the official table. With one apostrophe the key is the form without it ("dont");
# with several, the keys are the form with any one of them removed ("couldnt've", "couldn'tve").
_CONTRACTED = """
ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's
I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't
should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's
there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's
what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've
wouldn't y'all you'd you'll you're you've
couldn't've hadn't've he'd've I'd've it'd've mightn't've 'ow's'at she'd've shouldn't've somebody'd've
someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've you'd've
""".split()


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in _CONTRACTED:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        if len(cuts) == 1:
            table[word.replace("'", "")] = word
        else:
            for i in cuts:
                table[word[:i] + word[i + 1:]] = word
    # the official table's entries that do not follow the rule
    table.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"})
    return table


CONTRACTIONS = _contractions()
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official `processPunctuation` (see the module docstring for its quirks)."""
    out = text
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if remove_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower case, number words -> digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalise_prediction(text: str) -> str:
    """A model's answer as the official script compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def score(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one answer against the annotators' answers (10 in VQA v2), in [0, 1]."""
    if not references:
        raise ValueError("VQA accuracy needs the annotators' answers; got none")
    answer = normalise_prediction(prediction)
    answers = list(references)
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    matches = [a == answer for a in answers]
    total = sum(matches)
    # leave annotator i out: the others that match are total - matches[i]
    return sum(min(1.0, (total - own) / 3) for own in matches) / len(answers)
