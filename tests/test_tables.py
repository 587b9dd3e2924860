"""Tables with embedded images (issue 13 point 1): Parquet, Arrow and `save_to_disk` folders written by the real
`datasets` library (the outside reference), read back lazily by us; the pixels equal the same image read from
disk; stored samples do not grow with the images; bad rows are dropped with reasons and counted."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pyarrow.parquet  # noqa: F401  (pa.parquet below)
import pytest
from PIL import Image

from vlm.data.check import check_dataset
from vlm.data.dataset import SupervisedDataset
from vlm.data.errors import DataError
from vlm.data.mix import MixedRecords, Source
from vlm.visual.processor import ImageProcessor, ImageProcessorConfig

import datasets  # noqa: F401  (the dev extra: the outside reference that writes the tables)
import pyarrow as pa

CHECK = dict(template="vicuna_v1", num_image_tokens=4)


@pytest.fixture(scope="module", autouse=True)
def table_cache(tmp_path_factory):
    """Arrow copies of Parquet image tables go to a temporary folder, not ~/.cache."""
    from vlm.data.formats.table import TABLE_CACHE_ENV

    folder = tmp_path_factory.mktemp("table_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TABLE_CACHE_ENV, str(folder))
        yield folder
PROCESSOR = ImageProcessor(ImageProcessorConfig(image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))


def noise_png(path, size: int, seed: int):
    """A PNG of random pixels (so equal pixels cannot happen by accident); returns its path."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def embedded(path) -> dict:
    """An image cell as the hub's Parquet files hold it (`push_to_hub` embeds the file: bytes + its name).
    `Dataset.from_dict` with a plain path and `to_parquet` would keep only the path (test below)."""
    with open(path, "rb") as f:
        return {"bytes": f.read(), "path": os.path.basename(path)}


def image_features(**columns):
    from datasets import Features, Image as ImageFeature, List, Value

    def feature(kind):
        if kind == "image":
            return ImageFeature()
        if kind == "images":
            return List(ImageFeature())
        return Value(kind) if isinstance(kind, str) else kind

    return Features({name: feature(kind) for name, kind in columns.items()})


@pytest.fixture(scope="module")
def chartqa(tmp_path_factory):
    """ChartQA as the hub ships it (image, query, label: [str], human_or_machine), written by `datasets`:
    `train.parquet`, a `save_to_disk` folder, and the PNG files the images came from."""
    from datasets import Dataset, Sequence, Value

    root = tmp_path_factory.mktemp("chartqa")
    pngs = [str(noise_png(root / f"chart{k}.png", 20 + 4 * k, k)) for k in range(3)]
    table = Dataset.from_dict(
        {"image": [embedded(p) for p in pngs], "query": ["How many bars?", "What is the peak?", "Which year?"],
         "label": [["3"], ["14"], ["2019"]], "human_or_machine": [0, 1, 0]},
        features=image_features(image="image", query="string", label=Sequence(Value("string")),
                                human_or_machine="int64"))
    table.to_parquet(str(root / "train.parquet"))
    table.save_to_disk(str(root / "saved"))
    return root, pngs


@pytest.mark.parametrize("where", ["train.parquet", "saved"])
def test_chartqa_table_trains_with_the_pixels_of_the_files(chartqa, where, tiny_tokenizer):
    root, pngs = chartqa
    dataset = SupervisedDataset(str(root / where), tiny_tokenizer, "vicuna_v1", PROCESSOR, num_image_tokens=4)
    assert dataset.records.formats == ["qa_table"] and len(dataset) == 3
    for k, png in enumerate(pngs):
        item = dataset[k]
        expected = PROCESSOR([PROCESSOR.load(png)], return_tensors="pt")["pixel_values"]
        assert item["pixel_values"].shape == (1, 3, 16, 16)
        assert item["pixel_values"].equal(expected)  # bit for bit: same bytes, same decode
    sample = dataset.records[1][0]
    assert sample["messages"][1]["content"] == "14"  # the one-answer list
    assert sample["images"][0]["row"] == 1 and sample["images"][0]["column"] == "image"
    pickle.loads(pickle.dumps(dataset))  # DataLoader workers: nothing unpicklable held


def test_vlm_data_check_on_a_parquet_file(chartqa, tmp_path):
    from vlm.cli import run
    from vlm.cli.data import main as data_main

    root, _ = chartqa
    report_path = tmp_path / "data_report.json"
    assert run("vlm data", data_main, ["check", "--data_path", str(root / "train.parquet"), "--report",
                                        str(report_path), "--num_image_tokens", "4"]) == 0
    report = json.loads(report_path.read_text())
    assert (report["total"], report["kept"], report["dropped"]) == (3, 3, {})
    assert report["notes"]["sources"][0]["format"] == "qa_table"
    assert "table file" in report["notes"]["format_detection"][0]["how"]


def test_stored_samples_do_not_grow_with_image_size(tmp_path):
    """The indexed dataset keeps a reference per image, not its bytes: a table of 600x600 noise images (about
    1 MB each) stores the same record sizes as one of 8x8 images."""
    from datasets import Dataset

    sizes = {}
    for size in (8, 600):
        pngs = [str(noise_png(tmp_path / f"{size}_{k}.png", size, k)) for k in range(3)]
        Dataset.from_dict({"image": [embedded(p) for p in pngs], "query": ["q"] * 3, "label": ["a"] * 3},
                          features=image_features(image="image", query="string", label="string")
                          ).to_parquet(str(tmp_path / f"t{size}.parquet"))
        records = MixedRecords([Source(str(tmp_path / f"t{size}.parquet"))])
        sizes[size] = [records.stored_size(k) for k in range(3)]
    large_image_bytes = (tmp_path / "600_0.png").stat().st_size
    assert large_image_bytes > 1_000_000
    # the stored JSON differs only by the image's name ("8_0.png" vs "600_0.png") and the table's name
    assert all(abs(a - b) <= 8 for a, b in zip(sizes[8], sizes[600])), sizes
    assert max(sizes[600]) < 400  # mostly the table's absolute path


def test_rlaif_v_table_with_bad_rows_dropped_with_reasons(tmp_path):
    from datasets import Dataset

    good = str(noise_png(tmp_path / "good.png", 12, 0))
    rows = {
        "image": [{"bytes": open(good, "rb").read(), "path": "good.png"}] * 4
                 + [{"bytes": b"not an image", "path": "broken.png"}, None],
        "question": ["What is it?", "Same?", "Empty?", "Fine?", "Broken?", "No image at all?"],
        "chosen": ["A chart.", "yes", "", "It is fine.", "A chart.", "Text only."],
        "rejected": ["A cat.", " yes ", "no", "It is not.", "A cat.", "Nothing."],
        "ds_name": ["rlaif"] * 6,
        "idx": list(range(6)),
    }
    Dataset.from_dict(rows, features=image_features(image="image", question="string", chosen="string",
                                                    rejected="string", ds_name="string", idx="int64")
                      ).to_parquet(str(tmp_path / "rlaif.parquet"))
    records = MixedRecords([Source(str(tmp_path / "rlaif.parquet"))], keep_meta=True)
    assert records.formats == ["rlaif_v"]
    first = records[0][0]
    assert first["messages"] == [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert (first["chosen"], first["rejected"], first["id"], first["meta"]) == ("A chart.", "A cat.", "0",
                                                                                 {"ds_name": "rlaif"})
    assert records[5][0]["images"] == [] and records[5][0]["messages"][0]["content"] == "No image at all?"
    kept, report = check_dataset(Source(str(tmp_path / "rlaif.parquet")), **CHECK)
    assert kept == [0, 3, 5]
    assert report["dropped"] == {"unreadable_image": 1, "empty_answer": 1, "same_answers": 1}
    assert {p["id"]: p["reason"] for p in report["problems"]} == {"1": "same_answers", "2": "empty_answer",
                                                                  "4": "unreadable_image"}
    broken = next(p for p in report["problems"] if p["id"] == "4")
    assert re.search(r"image in rlaif\.parquet-\w+\.arrow row 4 column 'image'", broken["detail"])  # its Arrow copy
    # `vlm data check` writes the same report (and stops over the drop ratio: 3 of 6 dropped)
    from vlm.cli import run
    from vlm.cli.data import main as data_main

    argv = ["check", "--data_path", str(tmp_path / "rlaif.parquet"), "--report", str(tmp_path / "data_report.json"),
            "--num_image_tokens", "4"]
    assert run("vlm data", data_main, argv) == 1
    assert run("vlm data", data_main, argv + ["--max_drop_ratio", "0.5"]) == 0
    written = json.loads((tmp_path / "data_report.json").read_text())
    assert (written["dropped"], written["problems"]) == (report["dropped"], report["problems"])


def test_a_missing_column_drops_each_row_by_name(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"image": [embedded(noise_png(tmp_path / "a.png", 8, 0))], "question": ["Q?"], "chosen": ["A"]},
                      features=image_features(image="image", question="string", chosen="string")
                      ).to_parquet(str(tmp_path / "norejected.parquet"))
    kept, report = check_dataset(Source(str(tmp_path / "norejected.parquet"), format="rlaif_v"), **CHECK)
    assert kept == [] and report["dropped"] == {"bad_schema": 1}
    assert "'rejected' must be a string, got None" in report["problems"][0]["detail"]


def test_trl_table_with_a_list_of_images_and_conversational_prompt(tmp_path, tiny_tokenizer):
    """TRL's vision preference layout (`images`: a list of Image, conversational prompt/chosen/rejected), saved
    with save_to_disk; both images decode to the files' pixels, in order."""
    from datasets import Dataset

    a, b = (str(noise_png(tmp_path / f"{n}.png", 10, k)) for k, n in enumerate("ab"))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                          {"type": "text", "text": "Which is brighter?"}]}]
    table = Dataset.from_dict({
        "images": [[a, b]],
        "prompt": [prompt],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "The first."}]}]],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "The second."}]}]],
    })
    table = table.cast_column("images", image_features(images="images")["images"])
    table.save_to_disk(str(tmp_path / "trl"))
    dataset = SupervisedDataset(str(tmp_path / "trl"), tiny_tokenizer, "vicuna_v1", PROCESSOR, num_image_tokens=4)
    sample = dataset.records[0][0]
    assert dataset.records.formats == ["trl_preference"]
    assert sample["messages"] == [{"role": "user", "content": "<image>\n<image>\nWhich is brighter?"}]
    assert (sample["chosen"], sample["rejected"]) == ("The first.", "The second.")
    assert [image["item"] for image in sample["images"]] == [0, 1]
    pixels = dataset[0]["pixel_values"]
    expected = PROCESSOR([PROCESSOR.load(a), PROCESSOR.load(b)], return_tensors="pt")["pixel_values"]
    assert pixels.equal(expected)


def test_folder_of_parquet_shards_and_arrow_file_format(tmp_path):
    import pyarrow.feather

    from datasets import Dataset

    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        Dataset.from_dict({"image": [embedded(noise_png(tmp_path / f"s{k}.png", 8, k))], "query": [f"q{k}"],
                           "label": [f"a{k}"]}, features=image_features(image="image", query="string", label="string")
                          ).to_parquet(str(shards / f"train-0000{k}-of-00002.parquet"))
    records = MixedRecords([Source(str(shards))])
    assert [records[k][0]["messages"][1]["content"] for k in range(2)] == ["a0", "a1"]
    # the hub's data/ folder holds every split's shards: refused, a pattern picks one
    (shards / "test-00000-of-00001.parquet").write_bytes((shards / "train-00000-of-00002.parquet").read_bytes())
    with pytest.raises(DataError, match=r"several splits \(test, train\); pass one split's shards"):
        MixedRecords([Source(str(shards))])
    assert len(MixedRecords([Source(str(shards / "train-*.parquet"))])) == 2
    # the Arrow IPC *file* format (pyarrow.feather / ipc.new_file), not only datasets' stream format
    table = pa.parquet.read_table(shards / "train-00001-of-00002.parquet")
    pyarrow.feather.write_feather(table, tmp_path / "t.arrow", compression="uncompressed")
    kept, report = check_dataset(Source(str(tmp_path / "t.arrow")), **CHECK)
    assert kept == [0] and report["notes"]["sources"][0]["format"] == "qa_table"


def test_a_dataset_dict_folder_is_refused_in_one_line_naming_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    split = Dataset.from_dict({"query": ["q"], "label": ["a"]})
    DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict \(splits: train, test\); pass one split's folder"):
        MixedRecords([Source(str(tmp_path / "dd"))])
    (tmp_path / "not_a_table.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(DataError, match="cannot be read as a table"):
        MixedRecords([Source(str(tmp_path / "not_a_table.parquet"))])


def test_a_cell_holding_only_a_path_is_that_file_under_the_image_folder(tmp_path, tiny_tokenizer, monkeypatch):
    """`Dataset.from_dict(paths).to_parquet()` stores `{"bytes": None, "path": <as given>}`: the image is then the
    file, under --image_folder with its rules (relative paths; absolute ones only when allowed)."""
    from datasets import Dataset

    folder = tmp_path / "images"
    folder.mkdir()
    png = noise_png(folder / "x.png", 9, 3)
    monkeypatch.chdir(folder)  # datasets stats a relative path from the working directory while writing
    for name, value in (("relative", "x.png"), ("absolute", str(png))):
        Dataset.from_dict({"image": [value], "query": ["q"], "label": ["a"]},
                          features=image_features(image="image", query="string", label="string")
                          ).to_parquet(str(tmp_path / f"{name}.parquet"))
    expected = PROCESSOR([PROCESSOR.load(png)], return_tensors="pt")["pixel_values"]
    relative = SupervisedDataset(str(tmp_path / "relative.parquet"), tiny_tokenizer, "vicuna_v1", PROCESSOR,
                                 num_image_tokens=4, image_folder=str(folder))
    assert relative[0]["pixel_values"].equal(expected)
    kept, report = check_dataset(Source(str(tmp_path / "absolute.parquet"), str(folder)), **CHECK)
    assert report["dropped"] == {"unsafe_path": 1}
    allowed = Source(str(tmp_path / "absolute.parquet"), str(folder), allow_absolute_images=True)
    assert check_dataset(allowed, **CHECK)[0] == [0]


def test_the_validation_cache_key_follows_a_rewritten_shard(tmp_path):
    """A resume reuses a cached validation only for the same data: rewriting a shard inside a table folder
    leaves the folder's own stat unchanged, but changes the key."""
    from vlm.data.check_cache import validation_key
    from vlm.data.tokenizer import build_tokenizer
    from datasets import Dataset

    folder = tmp_path / "saved"
    Dataset.from_dict({"query": ["q"], "label": ["a"]}).save_to_disk(str(folder))
    tokenizer = build_tokenizer(["q a"], vocab_size=300)
    before = validation_key([Source(str(folder))], tokenizer, {})
    shard = next(folder.glob("*.arrow"))
    stat = os.stat(folder)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert os.stat(folder).st_mtime_ns == stat.st_mtime_ns
    assert validation_key([Source(str(folder))], tokenizer, {}) != before


def test_convert_and_filter_refuse_embedded_images_in_one_line(chartqa, tmp_path, capsys):
    from vlm.cli import run
    from vlm.cli.data import main as data_main

    root, _ = chartqa
    output = tmp_path / "out.json"
    for argv in (["convert", "--input", str(root / "train.parquet"), "--output", str(output)],
                 ["filter", "--data_path", str(root / "train.parquet"), "--keep-prefix", "chart", "--output",
                  str(output)]):
        assert run("vlm data", data_main, argv) == 2
        assert "embedded in a table" in capsys.readouterr().err
        assert not output.exists() and not list(tmp_path.glob("*.tmp"))


def test_train_py_trains_on_a_parquet_file_without_unpacking_images(chartqa, tmp_path):
    """`train.py --data_path chartqa/train.parquet`: the run validates the table (no image file on disk is read:
    the PNGs are removed first) and trains."""
    from vlm.cli.train import main as train_main
    from vlm.tiny import save_tiny_components

    root, pngs = chartqa
    table = tmp_path / "train.parquet"
    table.write_bytes((root / "train.parquet").read_bytes())  # beside no image file at all
    llm, vision = save_tiny_components(tmp_path / "models", ["How many bars? What is the peak? Which year? 3 14 2019"])
    out = tmp_path / "run"
    assert train_main(["--model_name_or_path", llm, "--vision_tower", vision, "--data_path", str(table),
                       "--output_dir", str(out), "--report_to", "none", "--dataloader_num_workers", "0",
                       "--use_cpu", "True", "--max_steps", "2", "--per_device_train_batch_size", "3",
                       "--save_strategy", "no", "--logging_steps", "1"]) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert (report["total"], report["kept"]) == (3, 3) and report["notes"]["sources"][0]["format"] == "qa_table"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_parquet_image_cells_are_read_from_an_arrow_copy_made_once(chartqa, table_cache, tmp_path):
    """A Parquet image table is copied once to Arrow (random access without decoding whole row groups); the copy
    is reused while the file is unchanged and made again when it changes."""
    root, _ = chartqa
    table = tmp_path / "train.parquet"
    table.write_bytes((root / "train.parquet").read_bytes())
    first = MixedRecords([Source(str(table))])[0][0]["images"][0]["table"]
    assert first.endswith(".arrow") and os.path.dirname(first) == str(table_cache)
    made = os.stat(first).st_mtime_ns
    assert MixedRecords([Source(str(table))])[0][0]["images"][0]["table"] == first
    assert os.stat(first).st_mtime_ns == made  # reused, not rewritten
    os.utime(table, ns=(made, made + 10**9))
    assert MixedRecords([Source(str(table))])[0][0]["images"][0]["table"] != first
    assert not list(table_cache.glob("*.tmp"))


def test_in_memory_embedded_images_in_plain_samples(tmp_path):
    """`{"bytes", "path"}` entries (as `datasets` hands out an undecoded Image cell) are checked and decoded like
    the files they hold; `{"bytes": None, "path": ...}` is that file under the image folder."""
    from vlm.data.paths import ImageFolder

    png = noise_png(tmp_path / "n.png", 10, 7)
    data = png.read_bytes()

    def sample(sample_id, image):
        return {"id": sample_id, "images": [image], "messages": [{"role": "user", "content": "<image>\nWhat?"},
                                                                  {"role": "assistant", "content": "noise"}]}

    samples = [sample("bytes", {"bytes": data, "path": "n.png"}), sample("by_path", {"bytes": None, "path": "n.png"}),
               sample("broken", {"bytes": data[:40], "path": None}), sample("gone", {"bytes": None, "path": "x.png"}),
               sample("bad_entry", {"bytes": "not bytes"})]
    kept, report = check_dataset(samples, image_folder=str(tmp_path), **CHECK)
    assert kept == [0, 1]
    assert {p["id"]: p["reason"] for p in report["problems"]} == {"broken": "unreadable_image", "gone": "missing_image",
                                                                  "bad_entry": "bad_schema"}
    expected = np.asarray(Image.open(png).convert("RGB"))
    assert (np.asarray(ImageFolder(str(tmp_path)).open({"bytes": data, "path": None})) == expected).all()
