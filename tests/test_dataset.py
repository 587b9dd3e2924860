"""SupervisedDataset (lazy, picklable, item shapes) and multi-source mixing (weights, seeds, mix files)."""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml

from vlm.data.conversation import IGNORE_INDEX
from vlm.data.dataset import SupervisedDataset
from vlm.data.errors import SampleError
from vlm.data.mix import MixedRecords, Source, load_mix_file, parse_sources
from vlm.data.tokenizer import get_image_token_id
from vlm.visual.processor import ImageProcessor, ImageProcessorConfig

NUM_IMAGE_TOKENS = 4


class CountingProcessor:
    """An ImageProcessor that counts its calls (to prove nothing is decoded at index time)."""

    def __init__(self):
        self.inner = ImageProcessor(ImageProcessorConfig(image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
        self.calls = 0

    def __call__(self, images, **kwargs):
        self.calls += 1
        return self.inner(images, **kwargs)


@pytest.fixture
def llava_file(write_data, make_llava_record):
    r = make_llava_record
    return write_data("train.json", [
        r("one"),
        r("two", question="<image> left, <image> right: same colour?", answer="no", image=["ok.png", "sub/ok2.png"]),
        r("text", question="Is there a blue triangle?", answer="yes", image=None),
        r("broken", image="corrupt.png"),
        {"id": "bad", "conversations": 5},
    ])


def make_dataset(path, folder, tokenizer, processor=None, **kwargs):
    return SupervisedDataset(str(path), tokenizer, "vicuna_v1", processor, image_folder=str(folder),
                             num_image_tokens=NUM_IMAGE_TOKENS, **kwargs)


def test_items_have_the_contract_shapes(llava_file, data_image_folder, tiny_tokenizer):
    dataset = make_dataset(llava_file, data_image_folder, tiny_tokenizer, CountingProcessor(), max_length=256)
    assert len(dataset) == 5
    one, two, text = dataset[0], dataset[1], dataset[2]
    for item in (one, two, text):
        assert set(item) == {"input_ids", "labels", "pixel_values"}
        assert item["input_ids"].dtype == torch.long and item["labels"].dtype == torch.long
        assert item["input_ids"].shape == item["labels"].shape and item["input_ids"].ndim == 1
    assert one["pixel_values"].shape == (1, 3, 16, 16) and one["pixel_values"].dtype == torch.float32
    assert two["pixel_values"].shape == (2, 3, 16, 16)
    assert text["pixel_values"] is None
    image_id = get_image_token_id(tiny_tokenizer)
    assert (two["input_ids"] == image_id).sum() == 2 * NUM_IMAGE_TOKENS
    supervised = one["labels"][one["labels"] != IGNORE_INDEX]
    assert tiny_tokenizer.decode(supervised) == " red</s>"  # vicuna supervises the space after "ASSISTANT:"


def test_index_is_lazy_compact_and_estimates_lengths(llava_file, data_image_folder, tiny_tokenizer):
    processor = CountingProcessor()
    dataset = make_dataset(llava_file, data_image_folder, tiny_tokenizer, processor)
    assert processor.calls == 0  # nothing decoded at index time
    assert all(isinstance(blob, (bytes, tuple)) for blob in dataset.records._blobs)
    assert dataset.has_image == [True, True, False, True, False]
    assert dataset.lengths[1] - dataset.lengths[0] >= NUM_IMAGE_TOKENS  # one more image
    assert dataset.lengths[2] < NUM_IMAGE_TOKENS * 10 and all(n >= 0 for n in dataset.lengths)
    dataset[0]
    assert processor.calls == 1


def test_access_failures_name_index_id_and_file(llava_file, data_image_folder, tiny_tokenizer):
    dataset = make_dataset(llava_file, data_image_folder, tiny_tokenizer, CountingProcessor())
    with pytest.raises(SampleError) as info:
        dataset[3]
    error = info.value
    assert (error.reason, error.index, error.sample_id) == ("unreadable_image", 3, "broken")
    assert "train.json sample 3" in str(error) and "corrupt.png" in str(error)
    with pytest.raises(SampleError) as info:
        dataset[4]
    assert (info.value.reason, info.value.index, info.value.sample_id) == ("bad_schema", 4, "bad")
    no_processor = make_dataset(llava_file, data_image_folder, tiny_tokenizer)
    with pytest.raises(ValueError, match="image_processor"):
        no_processor[0]


def test_kept_indices_pickling_and_dataloader_workers(llava_file, data_image_folder, tiny_tokenizer):
    dataset = make_dataset(llava_file, data_image_folder, tiny_tokenizer, CountingProcessor(), indices=[2, 0])
    assert len(dataset) == 2 and dataset.has_image == [False, True]
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[1]["input_ids"], dataset[1]["input_ids"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    items = list(loader)
    assert torch.equal(items[0]["input_ids"], dataset[0]["input_ids"]) and items[1]["pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match="out of range"):
        make_dataset(llava_file, data_image_folder, tiny_tokenizer, indices=[9])


def test_truncate_turns_keeps_only_the_images_of_the_kept_turns(write_data, data_image_folder, tiny_tokenizer):
    long_answer = "A red circle next to a green square on a white background. " * 4
    path = write_data("multi.json", [{"id": "m", "image": ["ok.png", "sub/ok2.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": long_answer}]}])
    item = make_dataset(path, data_image_folder, tiny_tokenizer, CountingProcessor(), max_length=64, truncate="turns")[0]
    assert item["pixel_values"].shape[0] == 1 and len(item["input_ids"]) <= 64
    with pytest.raises(SampleError, match="too_long"):
        make_dataset(path, data_image_folder, tiny_tokenizer, CountingProcessor(), max_length=64)[0]


# ---------------------------------------------------------------- mixing


def ids_of(records: MixedRecords) -> list[str]:
    return [records[i][0]["id"] for i in range(len(records))]


@pytest.fixture
def two_sources(write_data, make_llava_record):
    a = write_data("a/a.json", [make_llava_record(f"a{k}") for k in range(10)])
    b = write_data("b/b.json", [make_llava_record(f"b{k}") for k in range(6)])
    return a, b


def test_weights_are_repeat_factors_and_reproducible_by_seed(two_sources, tmp_path):
    a, b = two_sources
    sources = parse_sources(f"{a},{b}", f"{tmp_path}/ia,{tmp_path}/ib", weights="1.5,2")
    mixed = MixedRecords(sources, seed=0)
    ids = ids_of(mixed)
    assert len(mixed) == 15 + 12
    assert ids[:10] == [f"a{k}" for k in range(10)] and len(set(ids[10:15])) == 5  # a whole pass + a random half
    assert ids[15:] == [f"b{k}" for k in range(6)] * 2
    assert ids == ids_of(MixedRecords(sources, seed=0))
    assert any(ids_of(MixedRecords(sources, seed=s))[10:15] != ids[10:15] for s in range(1, 6))
    assert mixed[0][1].root.endswith("ia") and mixed[20][1].root.endswith("ib")  # each source its own folder
    assert mixed.describe()[0] == {"path": str(a), "image_folder": f"{tmp_path}/ia", "format": "llava",
                                   "records": 10, "in_mix": 15}


def test_max_samples_then_repeat_and_single_folder_for_all(two_sources):
    a, b = two_sources
    capped = Source(str(a), "imgs", max_samples=4, repeat=2)
    ids = ids_of(MixedRecords([capped], seed=1))
    assert len(ids) == 8 and ids[:4] == ids[4:] and ids[:4] == sorted(ids[:4], key=lambda i: int(i[1:]))
    assert ids_of(MixedRecords([Source(str(a), "imgs", repeat=0)], seed=0)) == []  # weight 0 drops a source
    shared = parse_sources([str(a), str(b)], "one_folder")
    assert [s.image_folder for s in shared] == ["one_folder", "one_folder"]
    with pytest.raises(ValueError, match="one per path"):
        parse_sources([str(a), str(b)], "x,y,z")
    with pytest.raises(ValueError, match="repeat/weight"):
        Source(str(a), repeat=-1)


def test_mix_file_coco_llava_plus_ai_challenger(tmp_path, write_data, make_llava_record):
    """The design card's example: COCO captions in LLaVA form merged with AI Challenger captions."""
    write_data("mix/coco/llava_coco.json", [make_llava_record(f"coco{k}", question="<image>") for k in range(4)])
    write_data("mix/aic/captions.json", [{"image_id": f"{k}.jpg", "caption": ["一只猫", "两只狗", "一只鸟"]} for k in range(3)])
    mix = tmp_path / "mix" / "mix.yaml"
    mix.write_text(yaml.safe_dump([
        {"path": "coco/llava_coco.json", "image_folder": "coco/train2017"},
        {"path": "aic/captions.json", "image_folder": "aic/images", "format": "ai_challenger",
         "caption_mode": "sample", "weight": 2},
    ]))
    sources = load_mix_file(mix)
    assert sources[1].image_folder == str(tmp_path / "mix" / "aic" / "images")
    mixed = MixedRecords(parse_sources(str(mix)), seed=5)
    assert mixed.formats == ["llava", "ai_challenger"]
    assert len(mixed) == 4 + 3 * 2
    aic = [mixed[i][0] for i in range(4, 10)]
    assert [s["messages"][0]["content"] for s in aic] == ["<image>\n请描述这张图片。"] * 6
    assert ids_of(mixed) == ids_of(MixedRecords(parse_sources(str(mix)), seed=5))
    bad = tmp_path / "mix" / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"path": "coco/llava_coco.json", "prompt": "x"}]))
    with pytest.raises(ValueError, match="takes no option"):
        MixedRecords(load_mix_file(bad))
    with pytest.raises(ValueError, match="mix file"):
        parse_sources(str(mix), "images")


def test_shared_reader_options_must_apply_to_some_source(two_sources):
    a, _ = two_sources
    with pytest.raises(ValueError, match=r"\['caption_mode'\] apply to none"):
        MixedRecords(parse_sources(str(a), options={"caption_mode": "sample"}))
