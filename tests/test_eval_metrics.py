"""The metrics of `vlm eval` against the reference implementations' published behaviour on fixed examples.

- VQA accuracy: the official VQA evaluation's rules (GT-Vision-Lab/VQA vqaEval.py): the values below are
  computed by hand from its formula, min(#other matching annotators / 3, 1) averaged over the annotators,
  and its normalisation steps.
- ChartQA relaxed accuracy: pix2struct's own test (metrics_test.py: relaxed_accuracy 62.5 on 8 examples).
- Multiple choice: VLMEvalKit's can_infer cases (letter alone, in brackets, with its text, in a sentence;
  the option's text; ambiguous answers pick nothing).
- Captions: our wrapper equals pycocoevalcap's scorers called directly, pix2struct's published CIDEr (128.6 on
  its 8 examples), and an identical caption has BLEU-4 1.0.
"""

from __future__ import annotations

import pytest

from vlm.eval.metrics import METRICS, corpus_scores
from vlm.eval.metrics import caption, chartqa, choice, exact, vqa

# -- VQA --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agreeing, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_choose_9_average(agreeing, expected):
    # annotator i left out: the other agreeing ones are agreeing - 1 (i agrees) or agreeing (i does not);
    # e.g. 3 agree: 3 subsets give min(2/3, 1), 7 give min(3/3, 1): (3 * 2/3 + 7) / 10 = 0.9
    references = ["2"] * agreeing + ["3"] * (10 - agreeing)
    assert METRICS["vqa"]("2", references) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, normalised", [
    ("Two", "2"), ("None", "0"), ("ten", "10"),            # number words -> digits
    ("the dog.", "dog"), ("A cat", "cat"), ("an apple", "apple"),  # articles, the final period
    ("dont", "don't"), ("isnt it", "isn't it"), ("couldnt've", "couldn't've"),  # contractions
    ("yes, it is", "yes it is"),     # "," next to a space: removed without a space
    ("1,000", "1000"),               # a digit,digit anywhere: every mark removed without a space
    ("black/white", "black white"),  # "/" next to no space: becomes a space
    ("2.5", "2.5"),                  # a period followed by a digit stays
    ("  Red\n", "red"),
])
def test_vqa_normalisation_follows_the_official_steps(prediction, normalised):
    assert vqa.normalise_prediction(prediction) == normalised


def test_vqa_references_get_punctuation_only_and_only_when_they_differ():
    # the official script processes the annotators' answers with processPunctuation only, and only when they
    # are not all equal: "dog." matches "dog" among differing answers ...
    assert vqa.score("the dog", ["dog."] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    # ... but ten equal "Two" stay "Two" (the annotation files are pre-normalised to digits), so "two" -> "2"
    # does not match them
    assert vqa.score("two", ["Two"] * 10) == 0.0
    assert vqa.score("two", ["2"] * 10) == 1.0


def test_vqa_contraction_table_keeps_the_official_entries():
    table = vqa.CONTRACTIONS
    assert len(table) == 120  # the official dictionary's size
    assert table["dont"] == "don't" and table["couldn'tve"] == table["couldnt've"] == "couldn't've"
    assert table["'ows'at"] == "'ow's'at" and table["somebody'd"] == "somebodyd" and table["twas"] == "'twas"


# -- ChartQA --------------------------------------------------------------------------------------------


def test_chartqa_relaxed_accuracy_matches_pix2struct_published_test():
    predictions = ["abc", "abc", "Abc", "100%", "100%", "100%", "100%", "Don't"]
    targets = [["abc"], ["Abc"], ["abc"], ["96%"], ["94%"], ["0.96"], ["0.94"], ["Won't"]]
    assert 100 * corpus_scores("chartqa", predictions, targets)["chartqa"] == pytest.approx(62.5)


@pytest.mark.parametrize("prediction, references, expected", [
    ("105", ["100"], 1.0), ("105.1", ["100"], 0.0), ("95", ["100"], 1.0),  # within 5% of the reference
    ("12%", ["0.125"], 1.0),                                              # "12%" is 0.12
    ("0.0", ["0"], 0.0), ("0", ["0"], 1.0),                              # a zero reference: compared as text
    ("Yes", ["yes"], 1.0), (" Blue \n", ["blue"], 1.0), ("blue.", ["blue"], 0.0),
    ("7", ["seven", "7.2"], 1.0),                                         # the best of several references
])
def test_chartqa_relaxed_correctness_rules(prediction, references, expected):
    assert chartqa.score(prediction, references) == expected


# -- multiple choice ------------------------------------------------------------------------------------

OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(B)", "B"), ("B. cat", "B"), ("B) cat", "B"), ("The answer is B", "B"), ("Answer: B.", "B"),
    ("cat", "B"), ("It is a cat.", "B"),   # no letter: the one option whose text occurs
    ("A or B", None), ("dog or cat", None), ("an elephant", None),  # ambiguous or nothing: no pick
    ("Z, not a bird", None), ("Cannot determine the answer; maybe a cat", None),  # VLMEvalKit's 'Z' (no option)
])
def test_choice_extraction_follows_vlmevalkit_can_infer(prediction, letter):
    assert choice.extract_choice(prediction, OPTIONS) == letter
    assert choice.score(prediction, ["B"], options=OPTIONS) == float(letter == "B")


def test_choice_reference_may_be_the_option_text_and_options_come_from_the_question():
    question = "What animal is this?\nA. dog\nB. cat\nC. bird\nAnswer with the option's letter."
    options = choice.parse_options(question)
    assert options == {"A": "dog", "B": "cat", "C": "bird"}
    assert choice.score("B", ["cat"], options=options) == 1.0
    assert choice.score("The answer is C", ["cat"], options=options) == 0.0
    assert choice.parse_options("I. think so\nWhat is it?") == {}  # one stray line is not a list of options
    with pytest.raises(ValueError, match="not an option letter"):
        choice.score("B", ["elephant"], options=options)


# -- exact match ----------------------------------------------------------------------------------------


def test_exact_match_normalisation():
    assert exact.score(" Red. ", ["red"]) == 1.0 and exact.score("red circle", ["red"]) == 0.0
    assert exact.score("blue", ["red", "Blue"]) == 1.0


# -- captions -------------------------------------------------------------------------------------------

CAPTION_PREDICTIONS = ["a dog runs on the grass", "two cats sleeping on a red sofa.", "A man rides a bike"]
CAPTION_REFERENCES = [
    ["A dog running on the grass.", "a brown dog runs across a lawn", "The dog is running outside"],
    ["Two cats sleep on a sofa", "two kittens asleep on the red couch"],
    ["a man riding a bicycle down the street", "A person on a bike.", "a man rides his bike"],
]


def _pycocoevalcap_directly(predictions, references):
    """pycocoevalcap's scorers as its COCOEvalCap.evaluate calls them (PTBTokenizer, then each scorer)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({str(i): [{"caption": c} for c in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({str(i): [{"caption": p}] for i, p in enumerate(predictions)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"bleu4": bleu[3], "rouge_l": Rouge().compute_score(gts, res)[0], "cider_d": Cider().compute_score(gts, res)[0]}


needs_java = pytest.mark.skipif(not caption.java_available(), reason="PTBTokenizer needs Java (installed in CI)")


@needs_java
def test_caption_scores_equal_pycocoevalcap_called_directly():
    ours = caption.score_captions(CAPTION_PREDICTIONS, CAPTION_REFERENCES, tokenizer="auto")
    assert ours.tokenizer == "ptb"
    direct = _pycocoevalcap_directly(CAPTION_PREDICTIONS, CAPTION_REFERENCES)
    assert ours.values == pytest.approx(direct, abs=0, rel=0)
    assert 0 < ours.values["bleu4"] < 1 and ours.values["cider_d"] > 0
    assert len(ours.per_sample) == 3
    assert sum(s["cider_d"] for s in ours.per_sample) / 3 == pytest.approx(ours.values["cider_d"])


@needs_java
def test_caption_cider_matches_pix2struct_published_value_and_python_tokens_match_ptb():
    predictions = ["abc", "abc", "Abc", "100%", "100%", "100%", "100%", "Don't"]
    targets = [["abc"], ["Abc"], ["abc"], ["96%"], ["94%"], ["0.96"], ["0.94"], ["Won't"]]
    assert 100 * corpus_scores("caption", predictions, targets)["cider_d"] == pytest.approx(128.6, abs=0.05)
    sentences = ["A man's dog, running on the grass.", "Two dogs don't play -- they're sleeping!",
                 "A (small) cat sits on a mat...", "It's 5 o'clock; the U.S. flag waves",
                 "\"Quoted\" words and 'single' quotes", "A dog-like toy at 3.5 m/s", "Bananas, apples & pears"]
    ptb = caption.tokenize({"0": sentences}, "ptb")["0"]
    assert [caption.python_tokenize(s) for s in sentences] == ptb


def test_identical_caption_has_bleu4_one_with_either_tokenizer():
    text = "a small red circle next to a blue square"
    for tokenizer in ("python",) + (("ptb",) if caption.java_available() else ()):
        scores = caption.score_captions([text, "a green triangle on a white background"],
                                        [[text], ["a green triangle on white"]], tokenizer=tokenizer)
        assert scores.per_sample[0]["bleu4"] == pytest.approx(1.0, abs=1e-6)
        assert scores.per_sample[0]["rouge_l"] == pytest.approx(1.0)


def test_ptb_without_java_is_a_one_line_error(monkeypatch):
    from vlm.errors import UserError

    monkeypatch.setattr(caption.shutil, "which", lambda name: None)
    assert caption.resolve_tokenizer("auto") == "python"
    with pytest.raises(UserError, match="--caption_tokenizer python"):
        caption.resolve_tokenizer("ptb")
