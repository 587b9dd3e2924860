"""Start-up that does not grow with the run (issue 12, point 7): the validation result is cached in the output
folder and reused while its inputs are unchanged; `--group_by_modality_length` defaults to on for mixed data."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

import vlm.data.check as check_module
from vlm.data.check_cache import CACHE_DIR
from vlm.data.sampler import ModalityLengthGroupedSampler
from vlm.data.tokenizer import build_tokenizer
from vlm.train.arguments import parse_args
from vlm.train.dataset import build_train_dataset, groups_by_modality

NUM_IMAGE_TOKENS = 4


def _sample(i: int, image: bool) -> dict:
    """A LLaVA-format record."""
    question = f"What is shown in picture {i}?" if image else f"Say the number {i}."
    record = {"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                              {"from": "gpt", "value": f"It is number {i} " + "and more " * (i % 7)}]}
    return {**record, "image": "a.png"} if image else record


def _write(folder: Path, n: int = 12, *, text_only_every: int = 0, broken: tuple[int, ...] = (3,)) -> Path:
    """`n` samples (those in `broken` have two <image> for one image: dropped) and one image."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(folder / "images" / "a.png")
    samples = [_sample(i, image=not (text_only_every and i % text_only_every == 0)) for i in range(n)]
    for i in broken:
        samples[i]["conversations"][0]["value"] = "<image><image>" + samples[i]["conversations"][0]["value"]
    path = folder / "data.json"
    path.write_text(json.dumps(samples), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([t["value"] for i in range(50) for t in _sample(i, True)["conversations"]], vocab_size=300)


def _build(tokenizer, data: Path, out: Path, *flags: str, template: str = "vicuna_v1"):
    _, data_args, training_args = parse_args(
        ["--output_dir", str(out), "--data_path", str(data), "--image_folder", str(data.parent / "images"),
         "--model_max_length", "256", "--max_drop_ratio", "0.5", "--use_cpu", "True", "--report_to", "none", *flags])
    dataset = build_train_dataset(data_args, training_args, tokenizer, None, NUM_IMAGE_TOKENS, template)
    return dataset, json.loads((out / "data_report.json").read_text(encoding="utf-8")), training_args


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the checker that build_train_dataset runs."""
    calls = []
    real = check_module.check_dataset

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(check_module, "check_dataset", counting)
    return calls


def _indices(dataset) -> list[int]:
    return list(dataset._positions)


def test_second_start_reuses_the_result_without_checking(tmp_path, tokenizer, spy, capsys):
    data, out = _write(tmp_path), tmp_path / "run"
    first, report1, _ = _build(tokenizer, data, out)
    assert len(spy) == 1 and report1["kept"] == 11 and report1["dropped"] == {"placeholder_mismatch": 1}
    assert len(list((out / CACHE_DIR).glob("validation-*.json"))) == 1
    capsys.readouterr()
    second, report2, _ = _build(tokenizer, data, out)
    assert len(spy) == 1, "the checker ran again"
    assert _indices(second) == _indices(first) == [i for i in range(12) if i != 3]
    assert report2 == report1
    logged = capsys.readouterr().out
    assert logged.count("validation reused from") == 1 and "data: 12 samples, kept 11" in logged


@pytest.mark.parametrize("change", ["mtime", "size", "template", "max_length", "tokenizer"])
def test_a_changed_input_checks_again(tmp_path, tokenizer, spy, change):
    data, out = _write(tmp_path), tmp_path / "run"
    _build(tokenizer, data, out)
    flags, template, tok = [], "vicuna_v1", tokenizer
    if change == "mtime":
        st = os.stat(data)
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "size":  # sample 3 fixed, the old mtime put back: only the size tells
        st = os.stat(data)
        _write(tmp_path, broken=())
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(data).st_size != st.st_size
    elif change == "template":
        template = "plain"
    elif change == "max_length":
        flags = ["--model_max_length", "512"]
    else:
        tok = build_tokenizer(["another text entirely"] * 3 + [_sample(1, True)["conversations"][1]["value"]],
                              vocab_size=290)
    dataset, report, _ = _build(tok, data, out, *flags, template=template)
    assert len(spy) == 2, f"{change}: the cached result was reused"
    assert len(list((out / CACHE_DIR).glob("validation-*.json"))) == 2
    if change == "size":
        assert report["kept"] == 12
    assert report["notes"]["settings"]["max_length"] == (512 if change == "max_length" else 256)


@pytest.mark.parametrize("damage", ["truncated", "wrong_kept_count", "index_out_of_range", "not_json_object"])
def test_a_damaged_cache_is_recomputed_never_trusted(tmp_path, tokenizer, spy, capsys, damage):
    data, out = _write(tmp_path), tmp_path / "run"
    first, report1, _ = _build(tokenizer, data, out)
    (cache,) = (out / CACHE_DIR).glob("validation-*.json")
    stored = json.loads(cache.read_text(encoding="utf-8"))
    if damage == "truncated":
        cache.write_text(cache.read_text(encoding="utf-8")[:40], encoding="utf-8")
    elif damage == "wrong_kept_count":
        stored["kept"] = stored["kept"][:-1]
        cache.write_text(json.dumps(stored), encoding="utf-8")
    elif damage == "index_out_of_range":
        stored["kept"][-1] = 12
        cache.write_text(json.dumps(stored), encoding="utf-8")
    else:
        cache.write_text("[1, 2, 3]", encoding="utf-8")
    capsys.readouterr()
    second, report2, _ = _build(tokenizer, data, out)
    assert len(spy) == 2
    assert "validation cache" in capsys.readouterr().out
    assert _indices(second) == _indices(first) and report2 == report1
    _build(tokenizer, data, out)  # rewritten sound: reused
    assert len(spy) == 2


def test_modality_grouping_defaults_to_on_for_mixed_data_only():
    class Data:
        def __init__(self, has_image):
            self.has_image = has_image

    mixed, images, texts = Data([True, False, True]), Data([True, True]), Data([False])
    assert groups_by_modality(None, mixed) and not groups_by_modality(None, images)
    assert not groups_by_modality(None, texts)
    assert not groups_by_modality(False, mixed) and groups_by_modality(True, images)


@pytest.fixture(scope="module")
def tiny():
    sys.path.insert(0, str(Path(__file__).parent))
    from inference_helpers import tiny_model

    return tiny_model()


@pytest.mark.parametrize("mixed, flags, grouped", [
    (True, (), True), (False, (), False), (True, ("--group_by_modality_length", "False"), False),
    (False, ("--group_by_modality_length",), True)])
def test_the_trainer_groups_by_modality_for_mixed_data(tmp_path, tiny, capsys, mixed, flags, grouped):
    from vlm.data.collate import DataCollator
    from vlm.train.trainer import VLMTrainer

    model, tokenizer, processor = tiny
    data = _write(tmp_path, text_only_every=3 if mixed else 0)
    dataset, _, training_args = _build(tokenizer, data, tmp_path / "run", *flags, template="chatml")
    assert training_args.group_by_modality_length == (None if not flags else flags == ("--group_by_modality_length",))
    assert ("grouped by modality and length" in capsys.readouterr().out) == (mixed and not flags)
    trainer = VLMTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id), image_processor=processor)
    assert isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler) == grouped


def test_another_rank_reads_process_0s_result_after_the_barrier(tmp_path, tokenizer, spy, capsys):
    """Under torchrun process 0 checks inside `main_process_first` and writes the file; the others enter after
    its barrier and only read (here: rank 1 simulated by the arguments it sees)."""
    import contextlib

    data, out = _write(tmp_path), tmp_path / "run"
    first, report0, training_args = _build(tokenizer, data, out)
    _, data_args, _ = parse_args(["--output_dir", str(out), "--data_path", str(data), "--image_folder",
                                  str(tmp_path / "images"), "--max_drop_ratio", "0.5"])
    entered = []

    class Rank1:
        def __getattr__(self, name):
            return getattr(training_args, name)

        process_index = 1

        @contextlib.contextmanager
        def main_process_first(self, local=True, desc="work"):
            entered.append(local)
            yield

    capsys.readouterr()
    dataset = build_train_dataset(data_args, Rank1(), tokenizer, None, NUM_IMAGE_TOKENS, "vicuna_v1")
    assert entered == [False], "not behind the global barrier"
    assert len(spy) == 1 and _indices(dataset) == _indices(first)
    assert capsys.readouterr().out == ""  # process 0 speaks for the run
