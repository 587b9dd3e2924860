"""Multiple choice: the option letter a free-text answer picks, as MMBench-style evaluations extract it.

The extraction is VLMEvalKit's `can_infer` (vlmeval/utils/matching_util.py; MMBench's evaluator in
lmms-eval has the same two steps), without its ChatGPT fallback for answers it cannot read:
1. the letter: the characters `.()[],:;!*#{}` become spaces and the text is split on whitespace; when
   exactly one option letter is a word of it, that letter ("B", "(B)", "B. cat", "The answer is B");
2. otherwise the text: when exactly one option's text occurs in the lower-cased answer, that option
   ("a cat" picks the option "cat" when no other option's text occurs in it).
Anything else (no letter, two letters, two option texts) picks nothing and scores 0, and so do VLMEvalKit's
"Z" cases: one of its refusal sentences, or no option letter but a word "Z" (then the text is not matched).

Options are a {letter: text} mapping (`parse_options` reads them from "A. cat" lines of a question); with
none known, only step 1 runs, over the letters A-D and those the references name. A reference is a letter,
or an option's text (matched ignoring case and outer spaces).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

_SEPARATORS = ".()[],:;!*#{}"
_SPACES = str.maketrans(_SEPARATORS, " " * len(_SEPARATORS))
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s+(\S.*?)\s*$", re.MULTILINE)
DEFAULT_LETTERS = "ABCD"
# answers VLMEvalKit reads as picking no option (its 'Z'), before looking for a letter
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")


def parse_options(question: str) -> dict[str, str]:
    """{letter: text} from the question's option lines ("A. cat", "(B) dog", "C: bird"); {} when it has none.

    Only a run of consecutive letters from A counts (A, B, C ...), so a sentence that starts with "I." is not
    read as option I."""
    found = dict(_OPTION_LINE.findall(question))
    options = {}
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        if letter not in found:
            break
        options[letter] = found[letter]
    return options if len(options) >= 2 else {}


def extract_choice(prediction: str, options: Mapping[str, str] | None = None, letters: str = DEFAULT_LETTERS) -> str | None:
    """The option letter `prediction` picks (steps 1 and 2 of the module docstring), or None."""
    if any(refusal in prediction for refusal in REFUSALS):
        return None
    candidates = list(options) if options else list(letters)
    words = prediction.translate(_SPACES).split()
    named = [letter for letter in candidates if letter in words]
    if len(named) == 1:
        return named[0]
    if not named and "Z" in words:  # VLMEvalKit's "Z": the answer says none of the options
        return None
    if options:
        answer = prediction.lower()
        matched = [letter for letter, text in options.items() if str(text).lower() in answer]
        if len(matched) == 1:
            return matched[0]
    return None


def reference_letter(reference: str, options: Mapping[str, str] | None = None) -> str | None:
    """The letter a reference names: the letter itself ("B", "(B)", "B."), or the option whose text it is."""
    text = reference.strip()
    bare = text.translate(_SPACES).strip()
    if len(bare) == 1 and bare.isupper() and (not options or bare in options):
        return bare
    for letter, option in (options or {}).items():
        if str(option).strip().lower() == text.lower():
            return letter
    return None


def score(prediction: str, references: Sequence[str], options: Mapping[str, str] | None = None) -> float:
    """1.0 when the letter `prediction` picks is the one a reference names, else 0.0.

    Raises:
        ValueError: a reference that is neither a letter nor one of `options`' texts.
    """
    if not references:
        raise ValueError("multiple choice needs the right option (a letter or its text)")
    wanted = set()
    for reference in references:
        letter = reference_letter(reference, options)
        if letter is None:
            known = f"options {dict(options)}" if options else "no options (give them as 'A. text' lines)"
            raise ValueError(f"reference {reference!r} is not an option letter nor an option's text ({known})")
        wanted.add(letter)
    letters = DEFAULT_LETTERS + "".join(sorted(wanted - set(DEFAULT_LETTERS)))
    return float(extract_choice(prediction, options, letters) in wanted)
