"""VLMProcessor and two-line inference: the README's save/load/answer snippet on a tiny model, a folder every
loader accepts, inputs built exactly as training builds them."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

import vlm
from inference_helpers import tiny_model, tiny_tokenizer, write_image
from vlm.folders.load import load_pretrained_model
from vlm.data.conversation import IGNORE_INDEX, encode_sample
from vlm.generate.decoding import GenerationSettings, generate_ids
from vlm.generate.generator import load_generator
from vlm.processing import pad_id, stop_token_ids
from vlm.tiny import tiny_llm_config, tiny_vision_config

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The README snippet, as written, with tiny configs in place of the Hub ids: (folder, image path)."""
    folder = tmp_path_factory.mktemp("proc") / "out"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    # untied: a random model with tied embeddings only repeats its last input token
    model = vlm.build_model(vlm.VLMConfig(vision=vlm.VisionConfig(hf_config=tiny_vision_config("siglip").to_dict()),
                                          llm=vlm.LLMConfig(hf_config=tiny_llm_config(
                                              "qwen2", vocab_size=len(tok), tie_word_embeddings=False).to_dict())),
                            tokenizer=tok)
    processor = vlm.VLMProcessor.for_model(model, tok)
    model.save_pretrained(folder); processor.save_pretrained(folder)  # noqa: E702 (the README's line)
    image = write_image(folder.parent / "photo.png")
    return folder, str(image)


def test_readme_two_lines_answer_as_load_generator(saved):
    folder, image = saved
    model, processor = vlm.load(folder)
    answer = vlm.answer(model, processor, image, QUESTION, max_new_tokens=8)
    expected = load_generator(str(folder), settings=GenerationSettings(max_new_tokens=8)).answer(QUESTION, image)
    assert answer and answer == expected
    # the other spelling: the model and the processor loaded separately
    model = vlm.from_pretrained(folder)
    assert vlm.answer(model, vlm.VLMProcessor.from_pretrained(folder), image, QUESTION, max_new_tokens=8) == expected


def test_saved_folder_is_accepted_by_every_loader(saved, tmp_path, capsys):
    folder, image = saved
    # what the README showed before: the model alone is refused for inference
    model, _, _ = tiny_model()
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="is incomplete; missing: tokenizer.json.*VLMProcessor.for_model"):
        load_pretrained_model(tmp_path / "bare")

    tokenizer, model, image_processor, _ = load_pretrained_model(folder)
    processor = vlm.VLMProcessor.from_pretrained(folder)
    assert image_processor.config == processor.image_processor.config
    assert tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor.num_image_tokens == model.vlm_config.num_image_tokens
    assert processor.template == "tokenizer"  # the tiny tokenizer's own (ChatML) template, as training picks
    main = runpy.run_path(str(ROOT / "test.py"), run_name="vlm_test_script")["main"]
    capsys.readouterr()
    assert main(["--model", str(folder), "--image", image, "--prompt", QUESTION, "--max_new_tokens", "8"]) == 0
    assert capsys.readouterr().out == vlm.answer(model, processor, image, QUESTION, max_new_tokens=8) + "\n"


def test_inputs_are_the_training_prompt_and_generate_continues_them(saved):
    folder, image = saved
    model, processor = vlm.load(folder)
    inputs = processor(QUESTION, image)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    # training's tokens of the same turn, up to the first supervised (answer) token
    sample = {"id": "s", "images": ["x.png"], "messages": [{"role": "user", "content": QUESTION},
                                                           {"role": "assistant", "content": "red"}]}
    encoded = encode_sample(sample, processor.tokenizer, processor.template, num_image_tokens=processor.num_image_tokens)
    first_answer = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert inputs["input_ids"][0].tolist() == encoded.input_ids[:first_answer]
    assert inputs["attention_mask"].tolist() == [[1] * first_answer]
    assert torch.equal(inputs["pixel_values"], processor.image_processor([image_from(image)], return_tensors="pt")["pixel_values"])

    stops = stop_token_ids(processor.tokenizer, processor.template)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=stops,
                         pad_token_id=pad_id(processor.tokenizer))[0, first_answer:].tolist()
    out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
    assert processor.decode(out, skip_special_tokens=True).strip() == vlm.answer(model, processor, image, QUESTION,
                                                                                  max_new_tokens=8)


def image_from(path: str):
    from vlm.visual.processor import load_image

    return load_image(path)


def test_batch_is_left_padded_rows_of_single_prompts(saved):
    folder, image = saved
    model, processor = vlm.load(folder)
    texts = [QUESTION, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is there a square?"}]]
    batch = processor(texts, images=[image, None])
    singles = [processor(texts[0], image), processor(texts[1])]
    width = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        ids = single["input_ids"][0].tolist()
        assert batch["input_ids"][row, width - len(ids):].tolist() == ids
        assert batch["attention_mask"][row].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
    assert torch.equal(batch["pixel_values"], singles[0]["pixel_values"])  # one image, that of row 0
    stops = stop_token_ids(processor.tokenizer, processor.template)
    pad = pad_id(processor.tokenizer)
    rows = generate_ids(model, [s["input_ids"][0].tolist() for s in singles], batch["pixel_values"], stop_ids=stops,
                        pad_token_id=pad, settings=GenerationSettings(max_new_tokens=6))
    assert processor.decode(rows[0], skip_special_tokens=True).strip() == vlm.answer(model, processor, image, QUESTION,
                                                                                      max_new_tokens=6)


def test_mistakes_are_named(saved, tmp_path):
    folder, image = saved
    model, processor = vlm.load(folder)
    with pytest.raises(TypeError, match="pass images with images="):
        processor(image_from(image), QUESTION)  # transformers' (images, text) order
    with pytest.raises(ValueError, match="a batch of 2 prompts needs images=None or a list of 2 entries"):
        processor([QUESTION, QUESTION], images=[image])
    with pytest.raises(ValueError, match="return_tensors='np'"):
        processor(QUESTION, return_tensors="np")
    other, other_tok, _ = tiny_model(image_size=64)  # 64 image tokens, not 16
    with pytest.raises(ValueError, match="the processor is not this model's"):
        vlm.answer(other, processor, image, QUESTION)
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json; save the processor there"):
        vlm.VLMProcessor.from_pretrained(tmp_path / "bare")
