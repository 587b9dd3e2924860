"""The synthetic shapes set: determinism, balance, answers that match the pictures, split by image."""

from __future__ import annotations

import collections
import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from vlm.data.synth import (
    BACKGROUND,
    DEFAULT_COLORS,
    Shape,
    applicable_question_types,
    generate_shapes_dataset,
    main,
    make_scene,
)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    return out, generate_shapes_dataset(out, n_train=300, n_eval=60, seed=4)


def _records(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


def _expected_answer(question: str, scene: list[dict]) -> str:
    kinds = [s["shape"] for s in scene]
    colors = [s["color"] for s in scene]
    if question.startswith("What color is the "):
        kind = question.removeprefix("What color is the ").removesuffix("?")
        assert kinds.count(kind) == 1, f"ambiguous colour question {question!r} for {scene}"
        return colors[kinds.index(kind)]
    if question.startswith("What shape is the "):
        color = question.removeprefix("What shape is the ").removesuffix(" object?")
        assert colors.count(color) == 1, f"ambiguous shape question {question!r} for {scene}"
        return kinds[colors.index(color)]
    if question == "How many shapes are there?":
        return str(len(scene))
    color, kind = question.removeprefix("Is there a ").removesuffix("?").split()
    return "yes" if (color, kind) in zip(colors, kinds) else "no"


def test_same_seed_same_bytes_other_seed_differs(tmp_path, shapes_set):
    out, _ = shapes_set
    again = generate_shapes_dataset(tmp_path / "a", n_train=300, n_eval=60, seed=4)
    assert _digest(tmp_path / "a") == _digest(out)
    assert again["n_train_samples"] == len(_records(out, "train"))
    generate_shapes_dataset(tmp_path / "b", n_train=300, n_eval=60, seed=5)
    assert _digest(tmp_path / "b") != _digest(out)


def test_eval_images_do_not_depend_on_n_train(tmp_path, shapes_set):
    out, _ = shapes_set
    generate_shapes_dataset(tmp_path, n_train=10, n_eval=60, seed=4)
    assert (tmp_path / "eval.json").read_bytes() == (out / "eval.json").read_bytes()


def test_records_are_llava_json_with_one_word_answers(shapes_set):
    out, summary = shapes_set
    assert summary["image_folder"] == str(out / "images")
    for split in ("train", "eval"):
        records = _records(out, split)
        assert len(records) == summary[f"n_{split}_samples"] == 2 * summary[f"n_{split}_images"]
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert gpt["from"] == "gpt" and gpt["value"].isalnum() and gpt["value"] == gpt["value"].lower()
            assert (out / "images" / r["image"]).is_file()


def test_answers_match_the_scene_and_the_scene_matches_the_picture(shapes_set):
    out, _ = shapes_set
    records = _records(out, "train") + _records(out, "eval")
    for r in records:
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        assert r["conversations"][1]["value"] == _expected_answer(question, r["shapes"])
    for r in records[::2]:
        image = Image.open(out / "images" / r["image"]).convert("RGB")
        scene = [Shape(s["shape"], s["color"], tuple(s["box"])) for s in r["shapes"]]
        for shape in scene:
            assert image.getpixel(shape.inside_point()) == DEFAULT_COLORS[shape.color], (r["image"], shape)
        # outside every box the picture is background
        covered = {(x, y) for s in scene for x in range(s.box[0], s.box[2] + 1) for y in range(s.box[1], s.box[3] + 1)}
        assert all(image.getpixel((x, y)) == BACKGROUND for x in range(0, 64, 3) for y in range(0, 64, 3) if (x, y) not in covered)


def test_scenes_have_non_overlapping_shapes_of_varied_kinds_colours_and_sizes():
    rng = random.Random(0)
    scenes = [make_scene(rng, image_size=64, colors=list(DEFAULT_COLORS), shapes=("circle", "square", "triangle"), max_shapes=3) for _ in range(300)]
    for scene in scenes:
        assert 1 <= len(scene) <= 3
        for a in scene:
            for b in scene:
                if a is not b:
                    assert a.box[2] < b.box[0] or b.box[2] < a.box[0] or a.box[3] < b.box[1] or b.box[3] < a.box[1]
    shapes = [s for scene in scenes for s in scene]
    assert {s.kind for s in shapes} == {"circle", "square", "triangle"}
    assert {s.color for s in shapes} == set(DEFAULT_COLORS)
    assert len({s.box[2] - s.box[0] for s in shapes}) > 5
    assert {len(scene) for scene in scenes} == {1, 2, 3}


def test_question_types_and_yes_no_are_balanced(shapes_set):
    out, summary = shapes_set
    records = _records(out, "train")
    per_type = collections.Counter(r["question_type"] for r in records)
    assert set(per_type) == {"color", "shape", "count", "exists"}
    assert max(per_type.values()) - min(per_type.values()) <= 0.05 * len(records)
    assert summary["question_types"]["train"] == dict(per_type)
    exists = collections.Counter(r["conversations"][1]["value"] for r in records if r["question_type"] == "exists")
    assert abs(exists["yes"] - exists["no"]) <= 1
    counts = collections.Counter(r["conversations"][1]["value"] for r in records if r["question_type"] == "count")
    assert set(counts) == {"1", "2", "3"}


def test_questions_only_when_unambiguous():
    two_red = [Shape("circle", "red", (0, 0, 9, 9)), Shape("circle", "red", (20, 20, 29, 29))]
    assert applicable_question_types(two_red) == ["count", "exists"]
    mixed = [Shape("circle", "red", (0, 0, 9, 9)), Shape("square", "red", (20, 20, 29, 29))]
    assert applicable_question_types(mixed) == ["color", "count", "exists"]


def test_split_by_image(shapes_set):
    out, _ = shapes_set
    train = {r["image"] for r in _records(out, "train")}
    eval_ = {r["image"] for r in _records(out, "eval")}
    assert train and eval_ and not train & eval_
    assert all(name.startswith("train_") for name in train) and all(name.startswith("eval_") for name in eval_)


def test_configurable_and_validated(tmp_path):
    summary = generate_shapes_dataset(
        tmp_path, n_train=20, n_eval=0, seed=1, colors={"red": (255, 0, 0), "blue": (0, 0, 255)}, shapes=("square",),
        max_shapes=1, questions_per_image=1, question_types=("color", "count"),
    )
    records = _records(tmp_path, "train")
    assert len(records) == 20 and summary["n_eval_samples"] == 0
    assert {r["conversations"][1]["value"] for r in records} <= {"red", "blue", "1"}
    with pytest.raises(ValueError, match="shapes"):
        generate_shapes_dataset(tmp_path, n_train=1, n_eval=1, shapes=("hexagon",))
    with pytest.raises(ValueError, match="question_types"):
        generate_shapes_dataset(tmp_path, n_train=1, n_eval=1, question_types=("size",))


def test_main_writes_the_set(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--n_train", "5", "--n_eval", "2", "--image_size", "32", "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["n_train_images"] == 5
    assert Image.open(tmp_path / "images" / "eval_00001.png").size == (32, 32)
