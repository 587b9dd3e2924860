"""Issue 13 point 4: preference pairs for the synthetic shapes set, and the preference demo (a short supervised
stage, then DPO from it) that shows DPO works: held-out exact match and reward accuracy rise."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from PIL import Image

from vlm.data.synth import DEFAULT_COLORS, DEFAULT_SHAPES, generate_shapes_dataset, main, write_preference_pairs


@pytest.fixture(scope="module")
def pair_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    generate_shapes_dataset(out, n_train=200, n_eval=40, seed=3, grid=3, image_size=48, progress=False)
    write_preference_pairs(out)
    return out


def _truth_from_picture(question: str, image: Image.Image, scene: list[dict]) -> str:
    """The answer read off the picture: each listed shape's colour is checked at a pixel inside it (so the
    scene list is what was drawn), then the question is answered from it independently of the generator."""
    palette = {rgb: name for name, rgb in DEFAULT_COLORS.items()}
    for s in scene:
        x0, y0, x1, y1 = s["box"]
        x, y = (x0 + x1) // 2, (y0 + 2 * (y1 - y0) // 3 if s["shape"] == "triangle" else (y0 + y1) // 2)
        assert palette.get(image.getpixel((x, y))) == s["color"], (question, s)
    kinds, colors = [s["shape"] for s in scene], [s["color"] for s in scene]
    if question.startswith("What color is the "):
        kind = question.removeprefix("What color is the ").removesuffix("?")
        assert kinds.count(kind) == 1
        return colors[kinds.index(kind)]
    if question.startswith("What shape is the "):
        color = question.removeprefix("What shape is the ").removesuffix(" object?")
        assert colors.count(color) == 1
        return kinds[colors.index(color)]
    if question == "How many shapes are there?":
        return str(len(scene))
    color, kind = question.removeprefix("Is there a ").removesuffix("?").split()
    return "yes" if (color, kind) in zip(colors, kinds) else "no"


VOCABULARY = {"color": set(DEFAULT_COLORS), "shape": set(DEFAULT_SHAPES), "count": {"1", "2", "3"},
              "exists": {"yes", "no"}}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_pairs_chosen_is_right_for_the_picture_rejected_is_a_wrong_answer_of_the_same_kind(pair_set, split):
    supervised = json.loads((pair_set / f"{split}.json").read_text())
    pairs = json.loads((pair_set / f"{split}_preference.json").read_text())
    assert len(pairs) == len(supervised) > 50
    from_picture = collections.Counter()
    for pair, record in zip(pairs, supervised):
        # the same question as the supervised set's (one generator), LLaVA-style: conversation up to the question
        assert pair["id"] == record["id"] and pair["image"] == record["image"]
        assert pair["conversations"] == record["conversations"][:1]
        question = pair["conversations"][0]["value"].removeprefix("<image>\n")
        truth = _truth_from_picture(question, Image.open(pair_set / "images" / pair["image"]).convert("RGB"),
                                    pair["shapes"])
        assert pair["chosen"] == truth
        assert pair["rejected"] != truth and pair["rejected"] in VOCABULARY[pair["question_type"]], pair
        scene_values = {s["color" if pair["question_type"] == "color" else "shape"] for s in pair["shapes"]}
        from_picture[pair["rejected"] in scene_values] += pair["question_type"] in ("color", "shape")
    assert from_picture[True] > 0  # plausible: distractors taken from the picture when it has them
    kinds = collections.Counter(p["question_type"] for p in pairs)
    assert set(kinds) == set(VOCABULARY)


def test_pairs_are_deterministic_and_written_by_the_command(pair_set, tmp_path, capsys):
    first = (pair_set / "train_preference.json").read_bytes()
    write_preference_pairs(pair_set)
    assert (pair_set / "train_preference.json").read_bytes() == first
    assert main(["--out", str(tmp_path), "--n_train", "6", "--n_eval", "2", "--preference"]) == 0
    written = json.loads(capsys.readouterr().out)["preference"]
    assert json.loads(Path(written["eval"]).read_text())[0]["rejected"]


def test_pairs_need_a_complete_set(tmp_path):
    from vlm.errors import ConfigError

    with pytest.raises(ConfigError, match="no complete shapes set"):
        write_preference_pairs(tmp_path)
