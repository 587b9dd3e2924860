"""Evaluation during training (issue 14 point 2): --eval_data_path with --eval_steps, eval_loss, the generation
metric on a subset, the best checkpoint kept and loaded at the end, metrics.jsonl rows and the loss plot.

One short run (session-scoped, ~10 s) serves most tests: 6 steps, evaluated and saved every 2 steps, one
checkpoint kept, `--metric_for_best_model eval_loss --greater_is_better True` so that the best checkpoint is the
first (the highest eval loss of a run whose loss falls), not the newest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.data.synth import generate_shapes_dataset
from vlm.errors import ConfigError
from vlm.tiny import save_tiny_components
from vlm.train.config import RunConfig
from vlm.train.run import run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny LLM + vision folders, shapes training data, and eval data with one sample whose image is missing."""
    root = tmp_path_factory.mktemp("evaltrain")
    data = generate_shapes_dataset(root / "data", n_train=12, n_eval=4, image_size=32, seed=0, progress=False)
    with open(data["eval"], encoding="utf-8") as f:
        eval_records = json.load(f)
    eval_records.append({**eval_records[0], "id": "gone", "image": "missing.png"})
    with open(root / "eval.json", "w", encoding="utf-8") as f:
        json.dump(eval_records, f)
    with open(data["train"], encoding="utf-8") as f:
        texts = [turn["value"] for r in json.load(f) for turn in r["conversations"]]
    llm, vision = save_tiny_components(root / "models", texts)
    return {"root": root, "llm": llm, "vision": vision, "train": data["train"], "eval": str(root / "eval.json"),
            "eval_records": eval_records, "images": data["image_folder"]}


def flags(ws, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", ws["llm"], "--vision_tower", ws["vision"], "--data_path", ws["train"],
            "--image_folder", ws["images"], "--output_dir", str(out), "--report_to", "none", "--version", "v1",
            "--dataloader_num_workers", "0", "--use_cpu", "True", "--seed", "0", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", *extra]


EVAL_FLAGS = ("--eval_data_path", "EVAL", "--eval_steps", "2", "--max_drop_ratio", "0.2",
              "--per_device_eval_batch_size", "16")


def eval_flags(ws) -> list[str]:
    return [ws["eval"] if f == "EVAL" else f for f in EVAL_FLAGS]


@pytest.fixture(scope="module")
def best_run(workspace):
    out = workspace["root"] / "best"
    result = run(RunConfig.from_flags(flags(
        workspace, out, *eval_flags(workspace), "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "1",
        "--metric_for_best_model", "eval_loss", "--greater_is_better", "True", "--load_best_model_at_end", "True",
        "--eval_generation_samples", "3", "--eval_metric", "exact")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "result": result, "rows": rows, "evals": [r for r in rows if "eval_loss" in r]}


# -- 1. flags --------------------------------------------------------------------------------------------


def test_eval_steps_sets_the_strategy_and_the_flags_are_checked_together(workspace, tmp_path):
    config = RunConfig.from_flags(flags(workspace, tmp_path, "--eval_data_path", workspace["eval"],
                                        "--eval_steps", "5"))
    assert (config.training.eval_strategy.value, config.training.eval_steps) == ("steps", 5)
    assert config.data.eval_data_path == workspace["eval"] and config.data.eval_image_folder is None
    # transformers infers greater_is_better from the name, as for its own Trainer
    best_loss = RunConfig.from_flags(flags(workspace, tmp_path, *eval_flags(workspace),
                                           "--metric_for_best_model", "eval_loss"))
    assert best_loss.training.greater_is_better is False
    best_vqa = RunConfig.from_flags(flags(workspace, tmp_path, *eval_flags(workspace), "--eval_generation_samples",
                                          "4", "--eval_metric", "vqa", "--metric_for_best_model", "eval_vqa"))
    assert best_vqa.training.greater_is_better is True
    for extra, message in [
        (["--eval_steps", "5"], "--eval_steps 5 evaluates during training but there is no eval data"),
        (["--eval_data_path", workspace["eval"]], "say when to evaluate with --eval_steps N"),
        ([*eval_flags(workspace), "--metric_for_best_model", "eval_vqa"], "logs only eval_loss"),
        ([*eval_flags(workspace), "--eval_metric", "bleu"], "--eval_metric 'bleu': expected one of"),
        ([*eval_flags(workspace), "--eval_generation_samples", "-1"], "expected N >= 0"),
        (["--eval_generation_samples", "2"], "needs --eval_data_path"),
        ([*eval_flags(workspace), "--eval_references_field", "answers"], "add --eval_generation_samples N"),
        ([*eval_flags(workspace), "--eval_generation_samples", "2", "--deepspeed", "zero3"], "ZeRO-3 or FSDP"),
        (["--load_best_model_at_end", "--save_steps", "4"], "--load_best_model_at_end needs evaluations to compare"),
        # transformers' own check of its flags, as a one-line ConfigError
        ([*eval_flags(workspace), "--load_best_model_at_end", "--save_steps", "3"], "not a round multiple of 2"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_flags(flags(workspace, tmp_path, *extra))


def test_eval_steps_without_data_is_one_line_and_exit_2(workspace, tmp_path, capsys):
    from vlm.cli.train import main

    assert main(flags(workspace, tmp_path / "x", "--eval_steps", "5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval_data_path" in err[0], err
    assert not (tmp_path / "x").exists()


def test_every_eval_metric_is_one_of_vlm_evals_per_answer_metrics():
    from vlm.eval.metrics import METRICS
    from vlm.train.evaluation import EVAL_METRICS

    assert set(EVAL_METRICS) == set(METRICS)


# -- 2. the run: eval data, eval_loss, the generation metric ----------------------------------------------


def test_eval_data_is_validated_like_the_training_data_with_its_own_report(best_run):
    report = json.loads((best_run["out"] / "eval_data_report.json").read_text())
    assert (report["total"], report["kept"], report["dropped"]) == (9, 8, {"missing_image": 1})
    assert report["problems"][0]["id"] == "gone"
    assert json.loads((best_run["out"] / "data_report.json").read_text())["total"] == 24  # the training data's own
    assert len(best_run["result"].trainer.eval_dataset) == 8


def test_metrics_jsonl_has_an_eval_row_per_evaluation(best_run):
    evals = best_run["evals"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for row in evals:
        assert row["eval_loss"] > 0 and 0 <= row["eval_exact"] <= 1 and "loss" not in row
    train_steps = [r["step"] for r in best_run["rows"] if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]


def test_eval_loss_is_transformers_loss_on_full_logits_padded_or_packed(best_run):
    """eval_loss (supervised-only: no (B, T, V) logits) equals transformers' causal-LM loss on the full logits of the
    whole eval set; one eval batch holds it all, so padding and packing give the same value."""
    from vlm.data.collate import DataCollator, PackingCollator

    result = best_run["result"]
    trainer, model, tokenizer = result.trainer, result.model, result.tokenizer
    dataset = trainer.eval_dataset
    batch = DataCollator(pad_token_id=tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        full = model(**batch)  # the parent's (transformers') forward and ForCausalLMLoss
        skipped = model(**batch, skip_logits=True)
    assert full.logits.shape[:2] == batch["input_ids"].shape and skipped.logits is None
    torch.testing.assert_close(skipped.loss, full.loss, rtol=1e-5, atol=1e-6)

    padded = trainer.evaluate()["eval_loss"]
    trainer.data_collator = PackingCollator(tokenizer.pad_token_id, max_length=trainer.args.model_max_length)
    try:
        packed = trainer.evaluate()["eval_loss"]
    finally:
        trainer.data_collator = DataCollator(pad_token_id=tokenizer.pad_token_id)
    assert padded == pytest.approx(full.loss.item(), rel=1e-5) and packed == pytest.approx(padded, rel=1e-5)


@pytest.fixture(scope="module")
def talkative(workspace, tmp_path_factory):
    """An untrained model (it answers something) and its greedy answers (6 new tokens) to the first 4 eval
    questions, by a `Generator` of its own."""
    from vlm.data.paths import ImageFolder
    from vlm.generate.decoding import GenerationSettings
    from vlm.generate.generator import Generator
    from vlm.train.model_setup import build_for_training

    config = RunConfig.from_flags(flags(workspace, tmp_path_factory.mktemp("unused")))
    model, tokenizer, image_processor = build_for_training(config.model, config.data, config.training)
    model.eval()
    records = workspace["eval_records"][:4]
    generator = Generator(model, tokenizer, image_processor, "v1", 2048, GenerationSettings(max_new_tokens=6))
    answers = [generator.reply([{"role": "user", "content": r["conversations"][0]["value"]}],
                               [ImageFolder(workspace["images"]).open(r["image"])]).strip() for r in records]
    assert all(answers), answers
    return {"model": model, "tokenizer": tokenizer, "image_processor": image_processor, "records": records,
            "answers": answers}


def _eval_dataset(talkative, records: list[dict], path: Path, images: Path):
    """`records` as build_eval_dataset reads eval data (every field kept in `meta`)."""
    from vlm.data.dataset import SupervisedDataset
    from vlm.data.mix import MixedRecords, parse_sources

    path.write_text(json.dumps(records))
    return SupervisedDataset(MixedRecords(parse_sources(str(path), str(images)), keep_meta=True),
                             talkative["tokenizer"], "v1", talkative["image_processor"],
                             num_image_tokens=talkative["model"].vlm_config.num_image_tokens)


def _with_reply(record: dict, reply: str, **extra) -> dict:
    return {**record, "conversations": [record["conversations"][0], {"from": "gpt", "value": reply}], **extra}


def test_generation_metric_scores_the_models_greedy_answers(talkative, workspace, best_run, tmp_path):
    """References equal to the model's own greedy answers for two of four eval samples, a wrong one for the others:
    eval_exact is 0.5, so the metric answers the right questions, with the right template, through the one decode
    loop, and scores them."""
    from vlm.eval.evaluate import evaluate_exact_match
    from vlm.generate.generator import load_generator
    from vlm.train.evaluation import GenerationEval

    t = talkative
    images = Path(workspace["images"])
    records = [_with_reply(r, a if i % 2 == 0 else "zzz " + a)
               for i, (r, a) in enumerate(zip(t["records"], t["answers"]))]
    dataset = _eval_dataset(t, records, tmp_path / "answers.json", images)
    metric = GenerationEval(dataset, 4, "exact", template="v1", batch_size=3, max_new_tokens=6)
    score, produced = metric.compute(t["model"], t["tokenizer"], t["image_processor"])
    assert [p.strip() for p in produced] == t["answers"] and score == 0.5
    assert metric(t["model"], t["tokenizer"], t["image_processor"]) == {"eval_exact": 0.5}
    # the metric logged at the best step is what `vlm eval` measures on the saved (best) model
    best = next(r for r in best_run["evals"] if r["step"] == 2)
    saved = load_generator(best_run["result"].model_dir)
    measured = evaluate_exact_match(saved.model, saved.tokenizer, saved.image_processor, workspace["eval_records"][:3],
                                    str(images), template="v1", max_new_tokens=32)["accuracy"]
    assert best["eval_exact"] == pytest.approx(measured)


def test_vqa_metric_reads_the_annotators_answers_from_a_field(talkative, workspace, tmp_path):
    """--eval_metric vqa with --eval_references_field answers: the official VQA accuracy, min(#other annotators
    agreeing / 3, 1) averaged over the 10 leave-one-out subsets: 3 of 10 agreeing -> (3 * 2/3 + 7 * 1) / 10 = 0.9;
    10 of 10 -> 1.0. With the final reply as the only reference, a right answer could never score: refused."""
    from vlm.train.evaluation import GenerationEval

    t, images = talkative, Path(workspace["images"])
    first, second = t["records"][:2]
    records = [_with_reply(first, "ignored", answers=[t["answers"][0]] * 3 + [f"no{i}" for i in range(7)]),
               _with_reply(second, "ignored", answers=[t["answers"][1]] * 10)]
    dataset = _eval_dataset(t, records, tmp_path / "vqa.json", images)
    metric = GenerationEval(dataset, 2, "vqa", template="v1", batch_size=2, references_field="answers",
                            max_new_tokens=6)
    score, _ = metric.compute(t["model"], t["tokenizer"], t["image_processor"])
    assert score == pytest.approx((0.9 + 1.0) / 2)
    with pytest.raises(ConfigError, match=r"eval sample 0 .*1 reference answer.*--eval_references_field FIELD"):
        GenerationEval(dataset, 2, "vqa", template="v1", batch_size=2)


# -- 3. the best checkpoint -------------------------------------------------------------------------------


def test_rotation_keeps_the_best_checkpoint_and_the_final_model_is_its(best_run):
    out, evals = best_run["out"], best_run["evals"]
    best_step = max(evals, key=lambda r: r["eval_loss"])["step"]  # --greater_is_better True
    assert best_step == 2 != evals[-1]["step"], evals  # the case that matters: the best is not the newest
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    # recorded in the checkpoint itself (a resume knows which one to keep)
    assert state["best_model_checkpoint"] == str(out / "checkpoint-2") and state["best_global_step"] == 2
    final, best = load_file(out / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)


def test_without_load_best_the_final_model_is_the_last_steps(workspace, tmp_path):
    """The counter-test: a run without --load_best_model_at_end ends with other weights than checkpoint-2's (so the
    equality above is the loading, not an unchanged model); rotation still keeps the best, not the newest."""
    out = tmp_path / "last"
    run(RunConfig.from_flags(flags(
        workspace, out, *eval_flags(workspace), "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "1",
        "--metric_for_best_model", "eval_loss", "--greater_is_better", "True")))
    # as transformers' Trainer ends a run with save_total_limit=1: only the best checkpoint is left
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    final, best = load_file(out / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(final[k], best[k]) for k in final)


def test_lora_run_evaluates_with_generation(workspace, tmp_path):
    out = tmp_path / "lora"
    run(RunConfig.from_flags(flags(workspace, out, *eval_flags(workspace), "--max_steps", "2", "--lora_enable",
                                   "True", "--lora_r", "4", "--eval_generation_samples", "2",
                                   "--save_strategy", "no")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], sorted(k for k in r if k in ("eval_loss", "eval_exact"))) for r in rows if "eval_loss" in r] \
        == [(2, ["eval_exact", "eval_loss"])]


def test_qlora_run_evaluates_between_training_steps(workspace, tmp_path):
    """QLoRA with evaluation every step: bitsandbytes 0.50 repacks a 4-bit weight for good on its first no-grad
    forward in eval mode (on CPUs with AVX512-BF16), after which training fails; evaluation runs with the 4-bit
    layers left in train mode (`vlm.quantization.eval_mode`), so steps, evaluations and generation alternate."""
    out = tmp_path / "qlora"
    run(RunConfig.from_flags(flags(workspace, out, *eval_flags(workspace), "--max_steps", "3", "--eval_steps", "1",
                                   "--bits", "4", "--lora_enable", "True", "--lora_r", "4",
                                   "--eval_generation_samples", "2", "--save_strategy", "no")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2, 3]
    assert all("eval_exact" in r for r in rows if "eval_loss" in r)


# -- 4. the loss plot ---------------------------------------------------------------------------------------


def test_loss_plot_draws_the_eval_loss_as_a_second_series(best_run):
    from vlm.train.callbacks import loss_figure

    ax = loss_figure(best_run["rows"]).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["training loss", "eval loss"]
    assert list(ax.get_lines()[1].get_xdata()) == [2, 4, 6]
    assert list(ax.get_lines()[1].get_ydata()) == [r["eval_loss"] for r in best_run["evals"]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training loss", "eval loss"]
    without = loss_figure([r for r in best_run["rows"] if "eval_loss" not in r]).axes[0]
    assert len(without.get_lines()) == 1 and without.get_legend() is None
    assert (best_run["out"] / "loss.png").stat().st_size > 0


# -- 5. torchrun ----------------------------------------------------------------------------------------------


def test_torchrun_rank_0_computes_the_generation_metric_and_every_rank_gets_it(workspace, tmp_path):
    """Two processes: process 0 answers and scores, the value is broadcast; every rank picks the best checkpoint
    from it (`--metric_for_best_model eval_exact` raises a KeyError on a rank that lacks the value)."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         *flags(workspace, out, *eval_flags(workspace), "--max_steps", "2", "--save_steps", "2",
                "--per_device_train_batch_size", "2", "--eval_generation_samples", "3",
                "--metric_for_best_model", "eval_exact")],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and 0 <= evals[0]["eval_exact"] <= 1
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["best_metric"] == evals[0]["eval_exact"] and state["best_global_step"] == 2
