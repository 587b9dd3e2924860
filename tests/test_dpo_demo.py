"""Issue 13 point 4: preference pairs for the synthetic shapes set, and the preference demo (a short supervised
stage, then DPO from it) that shows DPO works: held-out exact match and reward accuracy rise."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from PIL import Image

from vlm.data.synth import DEFAULT_COLORS, DEFAULT_SHAPES, generate_shapes_dataset, main, write_preference_pairs
from vlm.demo_preference import PreferenceDemoConfig, run_preference_demo


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


# --- the preference demo: a short supervised stage, then DPO from it -------------------------------------------

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
# Measured with these defaults (seeded: the figures do not depend on the machine's load): held-out exact match
# 0.585 -> 0.675 (seeds 1, 2: 0.530 -> 0.675, 0.525 -> 0.700), preference accuracy on held-out pairs 0.650 -> 0.735,
# held-out reward accuracy 0.700. The supervised control (--method sft) rises as much: vlm/demo_preference.py.
ACCURACY_RISE = 0.05
PREFERENCE_RISE = 0.04


@pytest.fixture(scope="module")
def preference_demo(tmp_path_factory):
    run = tmp_path_factory.mktemp("preference_demo")
    figures = run_preference_demo(PreferenceDemoConfig(run_dir=str(run)))  # the defaults: `vlm demo --preference`
    return run, figures


def test_dpo_raises_held_out_accuracy_and_reward_accuracy_over_the_supervised_start(preference_demo):
    run, figures = preference_demo
    assert figures["n_questions"] == 200 and figures["n_pairs"] == 200
    # the supervised start is mediocre (reads colours, not yet existence), and reads the picture
    assert 0.45 < figures["accuracy_before"] < 0.75 and figures["accuracy_before"] > figures["blind_accuracy_before"]
    assert figures["accuracy_after"] >= figures["accuracy_before"] + ACCURACY_RISE, figures
    assert figures["accuracy_after"] > figures["blind_accuracy_after"] + 0.15  # still from the picture
    assert figures["preference_accuracy_after"] >= figures["preference_accuracy_before"] + PREFERENCE_RISE, figures
    # implicit rewards on pairs the run never saw: 0 for every pair at the start, so accuracy 0 there
    assert figures["reward_accuracy"] >= 0.6 and figures["reward_margin"] > 0
    assert json.loads((run / "eval.json").read_text())["accuracy_after"] == figures["accuracy_after"]


def test_dpo_metrics_log_rewards_and_training_reward_accuracy_rises(preference_demo):
    run, _ = preference_demo
    rows = [json.loads(line) for line in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 30  # 300 steps, logged every 10
    for row in train_rows:
        assert all(isinstance(row[k], float) for k in REWARD_KEYS), row
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-5)
        assert 0 <= row["rewards/accuracies"] <= 1
    first = sum(r["rewards/accuracies"] for r in train_rows[:3]) / 3
    last = sum(r["rewards/accuracies"] for r in train_rows[-5:]) / 5
    assert last > first + 0.05, (first, last)
    assert train_rows[-1]["rewards/margins"] > train_rows[0]["rewards/margins"] > -0.01


def test_demo_model_folders_reload(preference_demo):
    import vlm

    run, figures = preference_demo
    model = vlm.from_pretrained(run / "model")
    assert model.vlm_config.num_image_tokens == 9
    assert (run / "sft" / "eval.json").is_file() and (run / "sft" / "model" / "config.json").is_file()


def test_vlm_demo_preference_command_reaches_the_demo_with_its_flags(tmp_path, monkeypatch):
    import vlm.demo_preference
    from vlm.cli import main as vlm_main

    seen = []
    monkeypatch.setattr(vlm.demo_preference, "run_preference_demo", seen.append)
    assert vlm_main(["demo", "--preference", "--output_dir", str(tmp_path), "--dpo_steps", "7", "--beta", "0.3",
                     "--rpo_alpha", "0", "--lora", "True"]) == 0
    assert seen == [PreferenceDemoConfig(run_dir=str(tmp_path), dpo_steps=7, beta=0.3, rpo_alpha=0.0, lora=True)]
    assert vlm_main(["demo", "--preference", "--method", "ppo"]) == 2


@pytest.mark.parametrize("method,lora", [("sft", False), ("dpo", True)])
def test_second_stage_variants_train(tmp_path, capsys, method, lora):
    """The control (supervised training on the chosen answers instead of DPO) and DPO with LoRA, tiny."""
    config = PreferenceDemoConfig(run_dir=str(tmp_path), n_train=40, n_eval=4, sft_steps=4, dpo_steps=4,
                                  batch_size=4, method=method, lora=lora)
    figures = run_preference_demo(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"accuracy_before={figures['accuracy_before']:.4f} accuracy_after={figures['accuracy_after']:.4f} "
        f"reward_accuracy={figures['reward_accuracy']:.4f}")
    stage = tmp_path / ("dpo" if method == "dpo" else "sft_control")
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(("rewards/margins" in r) == (method == "dpo") for r in rows if "loss" in r)
    assert figures["dpo_steps"] == 4
    record = json.loads((stage / "vlm_run.json").read_text())
    assert record["lora_enable"] is lora and record.get("method", "sft") == method  # sft: the record omits defaults
