"""`vlm eval` end to end on a tiny model: any data the readers read, every metric, the outputs, the bad inputs.

The tiny model has random weights, so its answers are arbitrary but fixed: the module first asks it every
question through `Generator.answer` (the one decode loop, the folder's template) and then writes evaluation
sets whose references agree with those answers for some records and not for others, so each score is known
in advance from the metric's published rule (e.g. 3 of 10 VQA annotators agreeing gives 0.9).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from inference_helpers import command, save_tiny_folder, write_image
from test_convert import llava_folder  # noqa: F401  (a fixture: a tiny original LLaVA-1.5 folder)
from vlm.eval.metrics import vqa

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
QUESTIONS = ["What color is the circle?", "What shape is it?", "How many shapes are there?", "Is there a blue square?"]
MAX_NEW_TOKENS = "4"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, image folder, {(image, question): the model's answer})."""
    from vlm.generate.decoding import GenerationSettings
    from vlm.generate.generator import load_generator

    root = tmp_path_factory.mktemp("eval_cli")
    folder = save_tiny_folder(root / "model", "clip", "qwen2", template="chatml", seed=3)
    images = root / "images"
    images.mkdir()
    for name, color in COLORS.items():
        write_image(images / f"{name}.png", color)
    generator = load_generator(str(folder), settings=GenerationSettings(max_new_tokens=int(MAX_NEW_TOKENS)))
    answers = {(f"{name}.png", q): generator.answer(f"<image>\n{q}", str(images / f"{name}.png"))
               for name in COLORS for q in QUESTIONS + ["Describe the image."]}
    assert all(a.strip() for a in answers.values())  # the references below are built from them
    return folder, images, answers


def run_eval(setup, data: Path, out: Path, *extra: str) -> tuple[int, dict, list[dict]]:
    folder, images, _ = setup
    code = command("eval")(["--model", str(folder), "--data_path", str(data), "--image_folder", str(images),
                            "--output_dir", str(out), "--max_new_tokens", MAX_NEW_TOKENS, "--batch_size", "3", *extra])
    if code != 0:
        return code, {}, []
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return code, metrics, rows


def llava(record_id, image, question, reply=None, **fields):
    turns = [{"from": "human", "value": f"<image>\n{question}"}] + ([{"from": "gpt", "value": reply}] if reply else [])
    return {"id": record_id, "image": image, "conversations": turns, **fields}


def test_exact_on_llava_json_writes_predictions_metrics_and_the_blind_baseline(setup, tmp_path, capsys):
    _, _, answers = setup
    keys = [("red.png", QUESTIONS[0]), ("blue.png", QUESTIONS[1]), ("green.png", QUESTIONS[2]), ("yellow.png", QUESTIONS[3])]
    # the first two references are the model's own answers (one in other case, with a period): exact match 1.0
    references = [answers[keys[0]], answers[keys[1]].upper() + ".", "no such answer", "nor this one"]
    records = [llava(f"q{i}", image, q, ref, question_type=["color", "color", "count", "exist"][i])
               for i, ((image, q), ref) in enumerate(zip(keys, references))]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))
    code, metrics, rows = run_eval(setup, data, tmp_path / "out")
    assert code == 0
    assert [r["prediction"] for r in rows] == [answers[k] for k in keys]  # the one decode loop, batched
    assert [r["score"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert rows[0]["id"] == "q0" and rows[0]["question"] == QUESTIONS[0] and rows[1]["references"] == [references[1]]
    assert metrics["metric"] == "exact" and metrics["scores"] == {"exact": 0.5} and metrics["n"] == 4
    assert metrics["template"] == "chatml" and metrics["model"] == str(setup[0])
    assert metrics["references"] == "final assistant reply"
    assert set(metrics["blind_scores"]) == {"exact"} and all("blind_score" in r for r in rows)  # on for exact
    assert metrics["per_question_type"]["color"]["score"] == 1.0 and metrics["per_question_type"]["count"]["n"] == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("exact=0.5000 blind_exact=")


def test_vqa_with_a_references_field_scores_the_official_way(setup, tmp_path):
    _, _, answers = setup
    said = vqa.normalise_prediction(answers[("red.png", QUESTIONS[0])])
    other = vqa.normalise_prediction(answers[("blue.png", QUESTIONS[0])])
    records = [  # 3 of 10 annotators agree -> 0.9; 1 -> 0.3 (JSON Lines, the answers a list field)
        llava("a", "red.png", QUESTIONS[0], answers=[said] * 3 + ["zzz"] * 7),
        llava("b", "blue.png", QUESTIONS[0], answers=[other] + ["zzz"] * 9),
    ]
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, metrics, rows = run_eval(setup, data, tmp_path / "out", "--metric", "vqa", "--references_field", "answers",
                                   "--no-blind")
    assert code == 0 and [r["score"] for r in rows] == pytest.approx([0.9, 0.3])
    assert metrics["scores"]["vqa"] == pytest.approx(0.6) and "blind_scores" not in metrics
    assert metrics["references"] == "field 'answers'" and len(rows[0]["references"]) == 10


def test_the_default_blind_baseline_is_skipped_with_the_reason_when_images_cannot_be_shuffled(setup, tmp_path):
    data = tmp_path / "one.json"
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
    data.write_text(json.dumps([llava("a", "red.png", QUESTIONS[0], "red"), text_only]))
    code, metrics, rows = run_eval(setup, data, tmp_path / "out")
    assert code == 0 and metrics["n"] == 2 and "blind_scores" not in metrics and "blind_score" not in rows[0]
    assert metrics["blind_skipped"].startswith("the blind baseline shuffles images across samples, but only one")


def test_chartqa_on_a_qa_table_and_choice_with_option_fields(setup, tmp_path):
    _, _, answers = setup
    table = tmp_path / "chart.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["imgname", "query", "label"])
        writer.writeheader()
        writer.writerow({"imgname": "green.png", "query": QUESTIONS[2], "label": answers[("green.png", QUESTIONS[2])]})
        writer.writerow({"imgname": "red.png", "query": QUESTIONS[2], "label": "12345"})
    code, metrics, rows = run_eval(setup, table, tmp_path / "chart", "--metric", "chartqa")
    assert code == 0 and [r["score"] for r in rows] == [1.0, 0.0] and metrics["scores"] == {"chartqa": 0.5}
    assert "blind_scores" not in metrics  # off by default for chartqa
    # MMBench style: options in fields A-C, the right letter in 'answer'; option B is what the model says
    said = answers[("yellow.png", QUESTIONS[1])]
    records = [llava("m1", "yellow.png", QUESTIONS[1], A="zzz qqq", B=said, C="www", answer="B"),
               llava("m2", "yellow.png", QUESTIONS[1], A="zzz qqq", B=said, C="www", answer="C")]
    data = tmp_path / "mmb.json"
    data.write_text(json.dumps(records))
    code, metrics, rows = run_eval(setup, data, tmp_path / "mmb", "--metric", "choice", "--references_field", "answer")
    assert code == 0 and [r["score"] for r in rows] == [1.0, 0.0]


def test_chartqa_on_a_parquet_table_with_embedded_images(setup, tmp_path):
    """ChartQA as the hub ships it (image bytes in the table, query, label): no image folder; the answers are the
    ones the model gives for the same pictures as files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, images, answers = setup
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the datasets Image feature's storage
    cells = [{"bytes": (images / f"{name}.png").read_bytes(), "path": None} for name in ("green", "red")]
    table = pa.table({"image": pa.array(cells, type=image_type), "query": [QUESTIONS[2]] * 2,
                      "label": [answers[("green.png", QUESTIONS[2])], "12345"]})
    pq.write_table(table, tmp_path / "chartqa.parquet")
    out = tmp_path / "out"
    code = command("eval")(["--model", str(folder), "--data_path", str(tmp_path / "chartqa.parquet"), "--metric", "chartqa",
                            "--output_dir", str(out), "--max_new_tokens", MAX_NEW_TOKENS])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert code == 0 and [r["prediction"] for r in rows] == [answers[(f"{n}.png", QUESTIONS[2])] for n in ("green", "red")]
    assert [r["score"] for r in rows] == [1.0, 0.0]


def test_vqa_v2_as_a_table_with_answer_objects_and_reader_columns(setup, tmp_path):
    """VQA v2 as the hub's tables store it: `question`, `multiple_choice_answer`, and `answers` a list of
    {"answer", "answer_confidence", "answer_id"}; the columns named with the reader flags."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, images, answers = setup
    said = vqa.normalise_prediction(answers[("blue.png", QUESTIONS[3])])
    annotators = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                  for k, a in enumerate([said] * 2 + ["zzz"] * 8)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": (images / "blue.png").read_bytes(), "path": None}], type=image_type),
                      "question": [QUESTIONS[3]], "multiple_choice_answer": ["zzz"], "answers": [annotators]})
    pq.write_table(table, tmp_path / "vqav2.parquet")
    code, metrics, rows = run_eval(setup, tmp_path / "vqav2.parquet", tmp_path / "out", "--metric", "vqa",
                                   "--question_column", "question", "--answer_column", "multiple_choice_answer",
                                   "--references_field", "answers")
    assert code == 0 and rows[0]["references"] == [said] * 2 + ["zzz"] * 8
    assert rows[0]["score"] == pytest.approx(0.6) and metrics["blind_skipped"]  # 2 of 10 agree; one image


def test_caption_merges_the_captions_of_an_image_and_records_the_tokenizer(setup, tmp_path):
    from vlm.eval.metrics.caption import score_captions

    records = [llava(f"c{i}", image, "Describe the image.", caption)
               for i, (image, caption) in enumerate([("red.png", "a red square on white"), ("red.png", "red block"),
                                                     ("blue.png", "a blue square"), ("blue.png", "blue box on white")])]
    data = tmp_path / "captions.json"
    data.write_text(json.dumps(records))
    code, metrics, rows = run_eval(setup, data, tmp_path / "out", "--metric", "caption", "--caption_tokenizer", "python")
    assert code == 0 and metrics["n"] == 2 and len(rows) == 2
    assert rows[0]["references"] == ["a red square on white", "red block"]
    assert metrics["caption_tokenizer"].startswith("python")
    expected = score_captions([r["prediction"] for r in rows], [r["references"] for r in rows], tokenizer="python")
    assert metrics["scores"] == pytest.approx(expected.values) and set(metrics["scores"]) == {"bleu4", "rouge_l", "cider_d"}


def test_a_llava_hf_export_of_the_model_gives_the_same_predictions(setup, tmp_path):
    from vlm.folders.export import export

    folder, images, answers = setup
    hf = tmp_path / "llava-hf"
    export(str(folder), str(hf))
    records = [llava(f"q{i}", f"{name}.png", QUESTIONS[0], "red") for i, name in enumerate(COLORS)]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))
    code = command("eval")(["--model", str(hf), "--data_path", str(data), "--image_folder", str(images),
                            "--output_dir", str(tmp_path / "out"), "--max_new_tokens", MAX_NEW_TOKENS, "--no-blind"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert code == 0 and [r["prediction"] for r in rows] == [answers[(f"{n}.png", QUESTIONS[0])] for n in COLORS]
    # the export carries chatml as the tokenizer's own chat template, which is what the folder prompts with
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["template"] == "tokenizer"


def test_a_lora_run_is_evaluated_as_the_adapted_model(setup, tmp_path):
    """A vlm LoRA run folder (adapter + base named by path) through the one loader: the predictions are the
    in-memory adapted model's answers."""
    import torch
    from transformers import Qwen2ForCausalLM

    import vlm
    from inference_helpers import tiny_tokenizer
    from vlm.folders.kinds import record_template
    from vlm.folders.lora import apply_lora, save_lora_run
    from vlm.generate.decoding import GenerationSettings
    from vlm.generate.generator import Generator
    from vlm.tiny import tiny_llm_config, tiny_vision_config
    from vlm.visual.processor import ImageProcessor

    _, images, _ = setup
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_llm_config("qwen2", vocab_size=256)).save_pretrained(tmp_path / "base")
    tokenizer = tiny_tokenizer()
    config = vlm.VLMConfig(vision=vlm.VisionConfig(hf_config=tiny_vision_config("clip").to_dict()),
                           llm=vlm.LLMConfig(name_or_path=str(tmp_path / "base")))
    model = apply_lora(vlm.build_model(config, tokenizer=tokenizer), r=4, alpha=8)
    for name, p in model.named_parameters():  # B starts at zero: make the adapter change the answers
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    model.eval()
    processor = ImageProcessor.from_vision_config(model.vlm_config.vision.hf_config, aspect_ratio="pad")
    save_lora_run(model, tmp_path / "run", tokenizer=tokenizer, image_processor=processor)
    record_template(tmp_path / "run", "chatml")
    live = Generator(model, tokenizer, processor, "chatml", 512, GenerationSettings(max_new_tokens=int(MAX_NEW_TOKENS)))
    expected = [live.answer(f"<image>\n{QUESTIONS[0]}", str(images / f"{n}.png")) for n in COLORS]
    with model.disable_adapter():  # the adapter matters: a loader that dropped it would answer otherwise
        assert [live.answer(f"<image>\n{QUESTIONS[0]}", str(images / f"{n}.png")) for n in COLORS] != expected
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([llava(f"q{i}", f"{n}.png", QUESTIONS[0], "red") for i, n in enumerate(COLORS)]))
    code = command("eval")(["--model", str(tmp_path / "run"), "--data_path", str(data), "--image_folder", str(images),
                            "--output_dir", str(tmp_path / "out"), "--max_new_tokens", MAX_NEW_TOKENS, "--no-blind"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert code == 0 and [r["prediction"] for r in rows] == expected


BAD = {
    "missing_field": ([llava("a", "red.png", "q", "red", answers=["red"] * 10), llava("b", "red.png", "q", "red")],
                      ["--metric", "vqa", "--references_field", "answers"],
                      "record 1 (0-based, id 'b'): no field 'answers' (--references_field)"),
    "no_answer": ([llava("a", "red.png", "q", "red"), llava("b", "red.png", "q")], [],
                  "record 1 (0-based, id 'b'): no answer to compare with"),
    "vqa_one_reference": ([llava("a", "red.png", "q", "red")], ["--metric", "vqa"],
                          "record 0 (0-based, id 'a'): 1 reference answer(s); VQA accuracy"),
    "not_an_option": ([llava("a", "red.png", "q\nA. red\nB. blue", "green")], ["--metric", "choice"],
                      "record 0 (0-based, id 'a'): reference 'green' is neither an option letter"),
    "blind_one_image": ([llava("a", "red.png", "q", "red")], ["--blind", "--metric", "chartqa"],
                        "the blind baseline shuffles images across samples, but only one sample has 1 image(s)"),
    "unknown_metric": ([llava("a", "red.png", "q", "red")], ["--metric", "bleu"],
                       "--metric 'bleu' is not a metric; use one of vqa, chartqa, choice, exact, caption"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_naming_the_file_and_record(case, setup, tmp_path, capsys, monkeypatch):
    import vlm.cli.eval

    records, flags, expected = BAD[case]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    monkeypatch.setattr(vlm.cli.eval, "_generator", lambda *a: pytest.fail("the model was loaded"))
    code, _, _ = run_eval(setup, data, tmp_path / "out", *flags)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("vlm eval: error: ") and expected in err, err
    if case not in ("unknown_metric", "blind_one_image"):
        assert str(data) in err
    assert not (tmp_path / "out").exists()



def test_vlm_eval_on_the_demo_set_reproduces_the_demos_eval_json(setup, tmp_path, capsys):
    """The README command on the demo's data (`vlm.data.synth`, as `python train.py` writes it): the same answers,
    accuracy, blind accuracy and question types as the demo's own evaluation (`evaluate_exact_match`, which
    writes eval.json) of the same model."""
    from vlm.data.synth import generate_shapes_dataset
    from vlm.eval.evaluate import evaluate_exact_match
    from vlm.eval.metrics.exact import normalise
    from vlm.generate.generator import load_generator

    folder, _, _ = setup
    info = generate_shapes_dataset(tmp_path / "data", n_train=1, n_eval=6, image_size=64, seed=0)
    generator = load_generator(str(folder))
    demo = evaluate_exact_match(generator.model, generator.tokenizer, generator.image_processor,
                                json.loads(Path(info["eval"]).read_text()), info["image_folder"], template="chatml")
    code = command("eval")(["--model", str(folder), "--data_path", info["eval"], "--image_folder", info["image_folder"],
                            "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "8"])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n"] == demo["n"] == len(rows) > 6
    assert [normalise(r["prediction"]) for r in rows[:10]] == [e["answer"] for e in demo["examples"]]
    assert (metrics["scores"]["exact"], metrics["blind_scores"]["exact"]) == (demo["accuracy"], demo["blind_accuracy"])
    assert {k: v["n"] for k, v in metrics["per_question_type"].items()} == \
        {k: v["n"] for k, v in demo["per_question_type"].items()}


# LLaVA-1.5's conv_vicuna_v1 (llava/conversation.py), the conv mode its evaluation scripts pass: written out here,
# not imported from vlm, so the test compares with LLaVA's format rather than with our own template
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the user's questions.")


def llava_greedy(tower, llm, projector, tokenizer, prompt: str, pixels, max_new_tokens: int) -> str:
    """LLaVA-1.5's answer, written out: `tokenizer_image_token` (each chunk around <image> tokenised with its BOS,
    which only the first keeps), the CLIP patches of layer -2 through the projector in place of the image, greedy
    decoding until </s> (eos), `batch_decode(skip_special_tokens=True)[0].strip()` as llava/eval/model_vqa.py."""
    import torch

    before, after = prompt.split("<image>")
    embed = llm.get_input_embeddings()
    with torch.no_grad():
        features = projector(tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]  # (P, D)
        inputs = torch.cat([embed(torch.tensor(tokenizer(before).input_ids)), features,
                            embed(torch.tensor(tokenizer(after).input_ids[1:]))])[None]  # (1, T, D)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(llm(inputs_embeds=inputs).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            inputs = torch.cat([inputs, embed(torch.tensor([[token]]))], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def llava15(llava_folder, tmp_path_factory):  # noqa: F811
    """tests/test_convert.py's tiny LLaVA-1.5 folder (LLaMA weights + model.mm_projector.* in pytorch_model.bin, the
    CLIP tower by path) with the LLM drawn at std 0.2: at transformers' 0.02 it answers every question alike."""
    import copy
    import shutil

    import torch

    folder, tower, llm, projector, tokenizer = llava_folder
    llm = copy.deepcopy(llm)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=generator)
    copied = tmp_path_factory.mktemp("llava15") / folder.name
    shutil.copytree(folder, copied)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state.update({k: v for k, v in llm.state_dict().items()})
    torch.save(state, copied / "pytorch_model.bin")
    return copied, tower, llm, projector, tokenizer


def test_an_original_llava_1_5_folder_is_evaluated_with_its_own_template_and_weights(setup, llava15, tmp_path):
    """`vlm eval` on an original LLaVA-1.5 folder: its predictions equal LLaVA-1.5's own forward and vicuna_v1
    prompt run by hand on the same weights; another prompt format or other projector weights answer otherwise."""
    import torch

    from vlm.generate.generator import load_generator
    from vlm.processing import load_pixels

    _, images, _ = setup
    folder, tower, llm, projector, tokenizer = llava15
    image_processor = load_generator(str(folder)).image_processor  # LLaVA's pad-to-square + CLIP normalisation
    pixels = {n: load_pixels([str(images / f"{n}.png")], image_processor) for n in COLORS}  # (1, 3, H, W) each

    cases = list(zip(COLORS, QUESTIONS))  # (image, question) per record

    def answers(prompt: str, proj=projector) -> list[str]:
        return [llava_greedy(tower, llm, proj, tokenizer, prompt.format(q=q), pixels[n], int(MAX_NEW_TOKENS))
                for n, q in cases]

    expected = answers(LLAVA_SYSTEM + " USER: <image>\n{q} ASSISTANT:")
    assert len(set(expected)) > 1 and all(expected)  # records answered differently: a mix-up would show
    other = torch.nn.Sequential(*(torch.nn.Linear(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
                                  else m for m in projector))
    assert answers("<image>\n{q}\n") != expected  # LLaVA's plain format: the template matters
    assert answers(LLAVA_SYSTEM + " USER: <image>\n{q} ASSISTANT:", other) != expected  # so do the weights
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([llava(f"q{i}", f"{n}.png", q, "red") for i, (n, q) in enumerate(cases)]))
    code = command("eval")(["--model", str(folder), "--data_path", str(data), "--image_folder", str(images),
                            "--output_dir", str(tmp_path / "out"), "--max_new_tokens", MAX_NEW_TOKENS, "--no-blind"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert code == 0 and [r["prediction"] for r in rows] == expected
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["template"] == "vicuna_v1"
