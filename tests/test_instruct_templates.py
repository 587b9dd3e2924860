"""Today's instruct models: their own chat templates (Qwen2.5, Llama-3, real template texts in tests/data) as
the reference for `tokenizer`, `chatml` and `llama3`; the default `--version`; per-sample template failures."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlm.data.check import check_dataset
from vlm.data.conversation import IGNORE_INDEX, encode_prompt, encode_sample
from vlm.data.errors import SampleError
from vlm.data.mix import Source
from vlm.data.templates import CHATML_SYSTEM, get_template
from vlm.data.tokenizer import build_tokenizer, get_image_token_id
from vlm.train.arguments import parse_args
from vlm.train.dataset import template_for

DATA = Path(__file__).parent / "data"
N_IMG = 4
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

SAMPLE = {"id": "q", "images": ["a.png"], "messages": [
    {"role": "user", "content": "<image>\nWhat color is the circle?"}, {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "2 shapes."}]}


@pytest.fixture(scope="module")
def qwen25_tokenizer(tiny_corpus):
    tokenizer = build_tokenizer(tiny_corpus, vocab_size=512)
    tokenizer.chat_template = (DATA / "qwen2_5_chat_template.jinja").read_text()
    return tokenizer


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_corpus):
    tokenizer = build_tokenizer(tiny_corpus, vocab_size=512)
    tokenizer.chat_template = (DATA / "llama3_chat_template.jinja").read_text()
    tokenizer.bos_token = "<|begin_of_text|>"
    return tokenizer


def _reference_ids(tokenizer, messages, **kwargs) -> list[int]:
    """transformers' apply_chat_template ids, each `<image>` id expanded to N_IMG (as vlm's data pipeline does)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]
    image_id = get_image_token_id(tokenizer)
    return [i for t in ids for i in ([t] * N_IMG if t == image_id else [t])]


def _supervised_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])


@pytest.mark.parametrize("name", ["tokenizer", "chatml"])
def test_qwen25_ids_equal_apply_chat_template(qwen25_tokenizer, name):
    """`tokenizer` (the model's own template) and `chatml` (with the system prompt read from it) both give
    exactly Qwen2.5's apply_chat_template ids, for training and for the generation prompt."""
    encoded = encode_sample(SAMPLE, qwen25_tokenizer, name, num_image_tokens=N_IMG)
    assert encoded.input_ids == _reference_ids(qwen25_tokenizer, SAMPLE["messages"])
    assert _supervised_text(qwen25_tokenizer, encoded) == "red<|im_end|>2 shapes.<|im_end|>"
    prompt = encode_prompt(SAMPLE["messages"][:3], qwen25_tokenizer, name, num_image_tokens=N_IMG)
    assert prompt == _reference_ids(qwen25_tokenizer, SAMPLE["messages"][:3], add_generation_prompt=True)


def test_chatml_default_system_comes_from_the_tokenizer(qwen25_tokenizer, tiny_tokenizer):
    assert get_template("chatml", qwen25_tokenizer).default_system == QWEN25_SYSTEM
    assert get_template("chatml", tiny_tokenizer).default_system == CHATML_SYSTEM  # Qwen2's template
    no_default = build_tokenizer([], vocab_size=300)  # a ChatML template with no default system (as Qwen3's)
    no_default.chat_template = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                                "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                                "{{ '<|im_start|>assistant\\n' }}{%- endif %}")
    assert get_template("chatml", no_default).default_system is None
    sample = {"id": "n", "images": [], "messages": SAMPLE["messages"][2:]}
    assert encode_sample(sample, no_default, "chatml", num_image_tokens=N_IMG).input_ids == \
        no_default.apply_chat_template(sample["messages"], tokenize=True)["input_ids"]
    no_template = build_tokenizer([], vocab_size=300)
    no_template.chat_template = None
    assert get_template("chatml", no_template).default_system == CHATML_SYSTEM  # documented in --help


def test_llama3_matches_meta_llama3_template(llama3_tokenizer):
    for name in ("llama3", "tokenizer"):
        encoded = encode_sample(SAMPLE, llama3_tokenizer, name, num_image_tokens=N_IMG)
        assert encoded.input_ids == _reference_ids(llama3_tokenizer, SAMPLE["messages"])
        assert _supervised_text(llama3_tokenizer, encoded) == "red<|eot_id|>2 shapes.<|eot_id|>"


def test_a_sample_the_template_cannot_render_is_dropped_not_fatal(llama3_tokenizer, tmp_path):
    """Llama-3's template trims replies: a reply with surrounding spaces cannot be located in its rendering."""
    spaced = {"id": "spaced", "images": [], "messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": " red "}]}
    with pytest.raises(SampleError) as info:
        encode_sample(spaced, llama3_tokenizer, "tokenizer", num_image_tokens=N_IMG)
    assert info.value.reason == "template_mismatch" and "whitespace" in info.value.detail
    records = [{"id": f"ok{i}", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}]}
               for i in range(3)]
    records.insert(1, {"id": "spaced", "conversations": [{"from": "human", "value": "Hi"},
                                                         {"from": "gpt", "value": " red "}]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    kept, report = check_dataset(Source(str(path), str(tmp_path)), tokenizer=llama3_tokenizer, template="tokenizer",
                                 num_image_tokens=N_IMG, max_length=512, check_images="none", num_workers=1)
    assert kept == [0, 2, 3]
    assert report["dropped"] == {"template_mismatch": 1}
    assert report["problems"][0]["id"] == "spaced" and report["problems"][0]["reason"] == "template_mismatch"


def _args(*flags: str):
    model_args, data_args, _ = parse_args(["--output_dir", "unused", *flags])
    return model_args, data_args


def test_version_defaults_to_the_llm_chat_template(qwen25_tokenizer, capsys, tmp_path):
    no_template = build_tokenizer([], vocab_size=300)
    no_template.chat_template = None
    llm = tmp_path / "Qwen2.5-0.5B-Instruct"  # a plain decoder LLM's folder
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    model_args, data_args = _args("--model_name_or_path", str(llm))
    assert data_args.version is None
    assert template_for(data_args, model_args, qwen25_tokenizer) == "tokenizer"
    assert "chat template" in capsys.readouterr().out
    assert template_for(data_args, model_args, no_template) == "vicuna_v1"
    stage1_model, stage1_data = _args("--model_name_or_path", str(llm), "--tune_mm_mlp_adapter", "True")
    assert template_for(stage1_data, stage1_model, qwen25_tokenizer) == "plain"
    for version in ("v1", "chatml", "plain"):  # an explicit --version is always honoured, stage 1 included
        explicit_model, explicit_data = _args("--model_name_or_path", str(llm), "--tune_mm_mlp_adapter", "True",
                                              "--version", version)
        assert template_for(explicit_data, explicit_model, qwen25_tokenizer) == version


def test_version_help_says_which_models_the_templates_match():
    from vlm.train.arguments import DataArguments

    help_text = DataArguments.__dataclass_fields__["version"].metadata["help"]
    assert "Qwen2.5" in help_text and "Llama-3.0" in help_text and "Llama-3.1" in help_text


def test_start_folder_template_is_kept(tmp_path, qwen25_tokenizer):
    """Continuing from a model folder: the template it records, not the tokenizer's."""
    from vlm.folders.kinds import record_template
    from inference_helpers import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "m", "clip", "qwen2", template="vicuna_v1")
    record_template(folder, "vicuna_v1")
    model_args = SimpleNamespace(model_name_or_path=str(folder), tune_mm_mlp_adapter=False)
    assert template_for(SimpleNamespace(version=None), model_args, qwen25_tokenizer) == "vicuna_v1"
