"""Generation: KV-cache consistency, batched == one-at-a-time, streaming, stopping, templates, errors."""

from __future__ import annotations

import io

import pytest
import torch

from inference_helpers import forget_template, save_tiny_folder, write_image
from vlm.generate.decoding import GenerationSettings, StreamToFile, generate_ids
from vlm.generate.generator import Generator, load_generator
from vlm.generate.prompts import check_template
from vlm.processing import default_template, left_pad, load_pixels, pad_id, stop_token_ids


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Generator:
    folder = save_tiny_folder(tmp_path_factory.mktemp("model"), "clip", "qwen2", template="chatml", seed=1)
    return load_generator(str(folder), settings=GenerationSettings(max_new_tokens=12))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    return [str(write_image(root / "red.png", (220, 40, 40), (40, 32))),
            str(write_image(root / "blue.png", (40, 80, 220), (30, 50))),
            str(write_image(root / "green.png", (40, 170, 60), (64, 64)))]


def greedy_without_cache(model, ids: list[int], pixels, steps: int) -> list[int]:
    """Reference decoding: the whole sequence recomputed at every step, no cache, argmax."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([seq]), pixel_values=pixels, use_cache=False).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def test_kv_cache_gives_the_same_tokens_as_full_recomputation(generator, images):
    ids = generator.prompt([{"role": "user", "content": "What color is the circle?"}], 1)
    pixels = load_pixels(images[:1], generator.image_processor)
    settings = GenerationSettings(max_new_tokens=12)
    kwargs = dict(stop_ids=[], pad_token_id=0, settings=settings)  # no stop: all 12 tokens compared
    cached = generate_ids(generator.model, [ids], pixels, use_cache=True, **kwargs)[0]
    uncached = generate_ids(generator.model, [ids], pixels, use_cache=False, **kwargs)[0]
    reference = greedy_without_cache(generator.model, ids, pixels, 12)
    assert len(cached) == 12
    assert cached == uncached == reference
    assert len(set(cached)) > 2  # a real sequence, not one token repeated


def test_batched_greedy_answers_equal_one_at_a_time(generator, images):
    questions = ["What color is the circle?", "How many shapes are there in this picture? Count them.",
                 "Is there a blue square?", "yes or no", "What shape is the red object?"]
    pictures = [images[0], images[1], None, images[2], images[0]]
    single_ids, batched_ids = [], []
    stops, pad = stop_token_ids(generator.tokenizer, generator.template), pad_id(generator.tokenizer)
    prompts = [generator.prompt([{"role": "user", "content": q}], int(p is not None)) for q, p in zip(questions, pictures)]
    assert len({len(p) for p in prompts}) > 2  # really different lengths: left padding is exercised
    for prompt, picture in zip(prompts, pictures):
        pixels = load_pixels([picture] if picture else [], generator.image_processor)
        single_ids += generate_ids(generator.model, [prompt], pixels, stop_ids=stops, pad_token_id=pad,
                                   settings=generator.settings)
    pixels = load_pixels([p for p in pictures if p], generator.image_processor)
    batched_ids = generate_ids(generator.model, prompts, pixels, stop_ids=stops, pad_token_id=pad,
                               settings=generator.settings)
    assert batched_ids == single_ids
    single = [generator.answer(q, p) for q, p in zip(questions, pictures)]
    assert generator.answer_batch(questions, pictures, batch_size=2) == single
    assert generator.answer_batch(questions, pictures, batch_size=8) == single


def test_left_padding():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_streaming_writes_the_answer_as_it_comes(generator, images):
    stream = io.StringIO()
    chunks = []
    original = StreamToFile.on_finalized_text

    def record(self, text, stream_end=False):
        chunks.append(text)
        original(self, text, stream_end)

    StreamToFile.on_finalized_text = record
    try:
        answer = generator.answer("What color is the circle?", images[0], stream=stream)
    finally:
        StreamToFile.on_finalized_text = original
    assert answer and stream.getvalue().strip() == answer
    assert len([c for c in chunks if c]) > 1  # several pieces, not one write at the end


def test_generation_stops_at_the_end_of_turn_token(generator):
    class Scripted:
        """Stands in for the model: returns the prompt followed by a fixed continuation."""

        def get_input_embeddings(self):
            return torch.nn.Embedding(1, 1)

        def generate(self, input_ids, **kwargs):
            tail = torch.tensor([[40, 41, end, 42, 43]] * input_ids.shape[0])
            return torch.cat([input_ids, tail], dim=1)

    end = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = stop_token_ids(generator.tokenizer, "chatml")
    assert stops == [end, generator.tokenizer.eos_token_id]
    out = generate_ids(Scripted(), [[1, 2, 3], [4]], None, stop_ids=stops, pad_token_id=0, settings=GenerationSettings())
    assert out == [[40, 41], [40, 41]]


def test_sampling_is_reproducible_with_a_seed(generator, images):
    sampler = Generator(**{**generator.__dict__, "settings": GenerationSettings(temperature=1.5, top_p=0.9,
                                                                                 max_new_tokens=12)})
    torch.manual_seed(3)
    first = sampler.answer("What color is the circle?", images[0])
    torch.manual_seed(3)
    assert sampler.answer("What color is the circle?", images[0]) == first
    answers = set()
    for seed in range(4):
        torch.manual_seed(seed)
        answers.add(sampler.answer("What color is the circle?", images[0]))
    assert len(answers) > 1


def test_multi_turn_prompt_keeps_history(generator, images):
    turn = [{"role": "user", "content": "<image>\nWhat color is the circle?"}]
    two = turn + [{"role": "assistant", "content": "red"}, {"role": "user", "content": "And the shape?"}]
    first, second = generator.prompt(turn, 1), generator.prompt(two, 1)
    text = generator.tokenizer.decode(second)
    assert "red<|im_end|>" in text and text.endswith("And the shape?<|im_end|>\n<|im_start|>assistant\n")
    assert second[: len(first)] == first


def test_prompt_longer_than_the_context_is_an_error(generator, images):
    short = Generator(**{**generator.__dict__, "context_len": 30})
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens \(16 of them image tokens\).*context of 30 tokens"):
        short.answer("What color is the circle?", images[0])


def test_unreadable_image_is_named(generator, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"cannot read image '.*broken.png'"):
        generator.answer("What color?", str(bad))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        generator.answer("What color?", str(tmp_path / "missing.png"))


def test_default_template(tmp_path, generator):
    assert default_template(generator_folder := save_tiny_folder(tmp_path / "m", template="llama3"), generator.tokenizer) == "llama3"
    forget_template(generator_folder)
    assert default_template(generator_folder, generator.tokenizer) == "tokenizer"  # its own chat_template
    generator.tokenizer.chat_template, saved = None, generator.tokenizer.chat_template
    try:
        with pytest.raises(ValueError, match="records no chat template.*--conv-mode"):
            default_template(generator_folder, generator.tokenizer)
    finally:
        generator.tokenizer.chat_template = saved


def test_settings_are_checked():
    with pytest.raises(ValueError, match="temperature=-1"):
        GenerationSettings(temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        GenerationSettings(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        GenerationSettings(max_new_tokens=0)


def test_template_that_does_not_fit_the_tokenizer(tmp_path):
    folder = save_tiny_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna2'"):
        load_generator(str(folder), conv_mode="vicuna2")


# -- a template other than the one the model was trained with -------------------------------------------


def test_conv_mode_that_differs_from_the_recorded_template_is_an_error_unless_forced(tmp_path, capsys):
    folder = save_tiny_folder(tmp_path / "m", template="chatml")
    with pytest.raises(ValueError, match=r"trained with chat template 'chatml'.*--conv-mode 'vicuna_v1'.*"
                                         r"drop --conv-mode.*--force-template"):
        load_generator(str(folder), conv_mode="vicuna_v1")
    forced = load_generator(str(folder), conv_mode="vicuna_v1", force_template=True)
    assert forced.template == "vicuna_v1"
    warning = capsys.readouterr().err
    assert "warning:" in warning and "'chatml'" in warning and "'vicuna_v1'" in warning
    # the recorded template, an alias of it, or one that prompts this tokenizer identically: no complaint
    assert load_generator(str(folder), conv_mode="chatml").template == "chatml"
    assert load_generator(str(folder), conv_mode="qwen").template == "qwen"
    assert capsys.readouterr().err == ""


def test_same_format_is_judged_by_the_tokenizers_own_template(tmp_path, generator):
    """A folder that records 'tokenizer' (its LLM's chat template, here ChatML in Jinja) accepts chatml, which
    renders the same ids as that template (transformers' apply_chat_template), and refuses vicuna_v1."""
    folder = save_tiny_folder(tmp_path / "m", template="tokenizer")
    messages = [{"role": "user", "content": "What color is the circle?"}]
    reference = generator.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert generator.prompt(messages, 0) == reference["input_ids"]  # chatml == the tokenizer's template
    check_template(folder, "chatml", generator.tokenizer)
    with pytest.raises(ValueError, match="'tokenizer'.*'vicuna_v1'"):
        check_template(folder, "vicuna_v1", generator.tokenizer)


def test_unknown_template_is_named_as_unknown_not_as_a_mismatch(tmp_path):
    folder = save_tiny_folder(tmp_path / "m", template="chatml")
    with pytest.raises(ValueError, match="unknown chat template 'chatm'"):
        check_template(folder, "chatm")


def test_a_folder_without_a_record_is_not_checked(tmp_path):
    folder = save_tiny_folder(tmp_path / "m", template="chatml")
    forget_template(folder)
    assert load_generator(str(folder), conv_mode="vicuna_v1").template == "vicuna_v1"


# -- images as people have them in Python ----------------------------------------------------------------


def test_numpy_arrays_and_tensors_answer_exactly_like_the_file(generator, images):
    import numpy as np

    from vlm.visual.processor import load_image

    array = np.asarray(load_image(images[1]))  # (H, W, 3) uint8, as PIL / imageio / cv2 (after BGR->RGB) give
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W) uint8, as torchvision.io.read_image gives
    from_file = load_pixels([images[1]], generator.image_processor)
    assert torch.equal(load_pixels([array], generator.image_processor), from_file)
    assert torch.equal(load_pixels([tensor], generator.image_processor), from_file)
    question = "What color is the circle?"
    expected = generator.answer(question, images[1])
    assert generator.answer(question, array) == generator.answer(question, tensor) == expected
    batch = generator.answer_batch([question] * 4, [images[0], array, tensor, None], batch_size=4)
    assert batch == [generator.answer(question, images[0]), expected, expected, generator.answer(question)]


def test_images_of_other_kinds_are_refused_naming_what_is_accepted(generator, images):
    import numpy as np

    from vlm.visual.processor import load_image

    floats = torch.from_numpy(np.array(load_image(images[0]))).permute(2, 0, 1).float() / 255  # ToTensor's output
    with pytest.raises(TypeError, match=r"dtype float32; only uint8 arrays.*astype\(np.uint8\)"):
        generator.answer("What color?", floats)
    with pytest.raises(TypeError, match=r"image 0 is a int; expected a file path.*PIL.Image.*uint8 numpy array"):
        generator.answer("What color?", 42)


def test_one_decode_loop(tmp_path, generator, images, monkeypatch):
    """`vlm eval` decodes through the loop every answer goes through (its own greedy loop is gone): the same
    answers as `Generator.answer`, and no module but vlm/generate/decoding.py calls a model's generate."""
    import pathlib
    import shutil

    import vlm.generate.generator
    from vlm.eval.evaluate import evaluate_exact_match, normalise

    folder = tmp_path / "img"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder)
    questions = ["What color is the circle?", "How many shapes are there?", "Is there a blue square?"]
    records = [{"id": str(i), "image": pathlib.Path(path).name, "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "red"}]}
        for i, (path, q) in enumerate(zip(images, questions))]
    calls, real = [], vlm.generate.generator.decode_prompts
    monkeypatch.setattr(vlm.generate.generator, "decode_prompts",
                        lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    result = evaluate_exact_match(generator.model, generator.tokenizer, generator.image_processor, records,
                                  str(folder), template=generator.template, batch_size=2)
    assert calls == [3, 3]  # the answers and the blind baseline
    short = Generator(**{**generator.__dict__, "settings": GenerationSettings(max_new_tokens=8)})
    assert [e["answer"] for e in result["examples"]] == [normalise(short.answer(f"<image>\n{q}", path))
                                                         for q, path in zip(questions, images)]
    root = pathlib.Path(vlm.generate.generator.__file__).parents[1]
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if ".generate(input_ids" in p.read_text() or "model.generate(" in p.read_text().replace(
                         "`model.generate(**inputs)`", ""))
    assert callers == ["generate/decoding.py"]
