"""Readers: each source format -> canonical samples, detection and its override, streaming JSON."""

from __future__ import annotations

import json

import pytest

from vlm.data.errors import SampleError
from vlm.data.formats import FORMATS, detect_format, read_source
from vlm.data.formats.source import iter_json_array


def samples_of(path, **kwargs) -> list:
    return list(read_source(path, **kwargs))


def qa(user: str, assistant: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------- LLaVA


def test_llava_json_images_roles_ids_and_meta(write_data, make_llava_record):
    records = [
        make_llava_record("a", source="coco"),
        make_llava_record(7, image=["x.png", "y.png"], question="<image> and <image>?"),
        {  # no id, no image, system + user/assistant spelling, role/content turns
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"role": "user", "content": "hi"},
                {"from": "assistant", "value": "hello"},
            ]
        },
    ]
    path = write_data("set.json", records)
    assert detect_format(path) == "llava"
    a, b, c = samples_of(path)
    assert a == {"id": "a", "images": ["ok.png"], "messages": qa("<image>\nWhat color is the circle?", "red"),
                 "meta": {"source": "coco"}}
    assert b["id"] == "7" and b["images"] == ["x.png", "y.png"]
    assert c == {"id": "set:2", "images": [], "messages": qa("hi", "hello", system="Be brief.")}


def test_llava_jsonl_bad_line_and_bad_records_are_reported_not_skipped(write_data, make_llava_record):
    good = json.dumps(make_llava_record("g"))
    unknown_role = json.dumps({"id": "r", "conversations": [{"from": "bot", "value": "x"}]})
    not_list = json.dumps({"id": "s", "conversations": "hello"})
    bad_image = json.dumps({"id": "i", "image": 3, "conversations": [{"from": "human", "value": "x"}]})
    path = write_data("set.jsonl", "\n".join([good, "{not json", unknown_role, not_list, bad_image]) + "\n")
    out = samples_of(path)
    assert len(out) == 5
    assert out[0]["id"] == "g"
    reasons = [(e.reason, e.index, e.sample_id) for e in out[1:]]
    assert reasons == [("bad_schema", 1, None), ("bad_roles", 2, "r"), ("bad_schema", 3, "s"), ("bad_schema", 4, "i")]
    assert "line 2" in out[1].detail and "'bot'" in out[2].detail


# ---------------------------------------------------------------- xtuner


def test_xtuner_input_output_and_role_content_styles(write_data):
    records = [
        {"id": "x1", "image": "ok.png", "conversation": [
            {"system": "You describe images.", "input": "<image>\nWhat is it?", "output": "a circle"},
            {"input": "Colour?", "output": "red"},
        ]},
        {"conversation": [{"system": "", "input": "2+2?", "output": "4"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversation": [{"input": "no answer"}]},
    ]
    path = write_data("xt.json", records)
    assert detect_format(path) == "xtuner"
    first, second, third, broken = samples_of(path)
    assert first["images"] == ["ok.png"]
    assert first["messages"] == qa("<image>\nWhat is it?", "a circle", system="You describe images.") + qa("Colour?", "red")
    assert second["messages"] == qa("2+2?", "4")  # an empty system is left out
    assert third == {"id": "xt:2", "images": [], "messages": qa("hi", "hello")}
    assert isinstance(broken, SampleError) and broken.reason == "bad_schema" and "'output'" in broken.detail


# ---------------------------------------------------------------- COCO


def test_coco_one_plain_sample_per_annotation(write_data):
    coco = {
        "info": {"year": 2017},
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A cat on a mat. "},
            {"id": 11, "image_id": 1, "caption": "A sleeping cat."},
            {"id": 12, "image_id": 2, "caption": "Two dogs."},
            {"id": 13, "image_id": 99, "caption": "Orphan."},
        ],
    }
    path = write_data("captions_train2017.json", coco)
    assert detect_format(path) == "coco"
    out = samples_of(path)
    assert [s["id"] for s in out[:3]] == ["10", "11", "12"]
    assert out[0] == {"id": "10", "images": ["000001.jpg"], "messages": qa("<image>", "A cat on a mat.")}
    assert out[2]["images"] == ["000002.jpg"]
    assert isinstance(out[3], SampleError) and out[3].reason == "bad_schema" and "99" in out[3].detail
    prompted = samples_of(path, prompt="Describe the image.")
    assert prompted[0]["messages"][0]["content"] == "<image>\nDescribe the image."


# ---------------------------------------------------------------- AI Challenger

AIC = [
    {"url": "http://x", "image_id": "a1.jpg", "caption": ["一只猫", "一只睡觉的猫", "猫在垫子上", "白色的猫", "小猫"]},
    {"url": "http://y", "image_id": "b2.jpg", "caption": ["两只狗", "狗在跑", "草地上的狗", "两只小狗", "狗"]},
]


def test_ai_challenger_each_caption_with_chinese_default_prompt(write_data):
    path = write_data("caption_train_annotations.json", AIC)
    assert detect_format(path) == "ai_challenger"
    out = samples_of(path)
    assert len(out) == 10
    assert out[0] == {"id": "a1.jpg:0", "images": ["a1.jpg"], "messages": qa("<image>\n请描述这张图片。", "一只猫")}
    assert [s["id"] for s in out[5:7]] == ["b2.jpg:0", "b2.jpg:1"]
    custom = samples_of(path, prompt="这是什么？")
    assert custom[0]["messages"][0]["content"] == "<image>\n这是什么？"


def test_ai_challenger_sampled_caption_is_seeded_and_order_independent(write_data):
    path = write_data("aic.json", AIC)
    once = samples_of(path, caption_mode="sample", seed=3)
    again = samples_of(path, caption_mode="sample", seed=3)
    assert once == again and [s["id"] for s in once] == ["a1.jpg", "b2.jpg"]
    assert once[0]["messages"][1]["content"] in AIC[0]["caption"]
    reversed_path = write_data("aic_reversed.json", AIC[::-1])
    assert samples_of(reversed_path, caption_mode="sample", seed=3)[::-1] == once
    choices = {tuple(s["messages"][1]["content"] for s in samples_of(path, caption_mode="sample", seed=k)) for k in range(12)}
    assert len(choices) > 1  # the seed matters
    with pytest.raises(ValueError, match="caption_mode"):
        samples_of(path, caption_mode="random")


# ---------------------------------------------------------------- question/answer tables


def test_qa_table_csv_defaults_and_text_only_rows(write_data):
    path = write_data("chartqa.csv", 'image,query,label\nc1.png,"Highest bar, in %?",42\n,What is 2+2?,4\n')
    assert detect_format(path) == "qa_table"
    chart, text = samples_of(path)
    assert chart == {"id": "chartqa:0", "images": ["c1.png"], "messages": qa("<image>\nHighest bar, in %?", "42")}
    assert text == {"id": "chartqa:1", "images": [], "messages": qa("What is 2+2?", "4")}


def test_qa_table_jsonl_configured_columns_system_and_imgname(write_data):
    rows = [{"qid": "q1", "picture": "c.png", "question": "Max?", "answer": 3.5, "split": "train"}]
    path = write_data("qa.jsonl", rows)
    with pytest.raises(ValueError, match="cannot detect"):  # default columns absent: not guessed
        detect_format(path)
    (sample,) = samples_of(path, format="qa_table", image_column="picture", question_column="question",
                           answer_column="answer", id_column="qid", system="Read the chart.")
    assert sample == {"id": "q1", "images": ["c.png"], "messages": qa("<image>\nMax?", "3.5", system="Read the chart."),
                      "meta": {"split": "train"}}
    # one answer in a list is that answer (ChartQA on the hub: label is a list of strings); several are refused
    chartqa = write_data("train_augmented.json", [{"imgname": "41699051005347.png", "query": "Value?",
                                                   "label": ["x", "y"]}])
    (broken,) = samples_of(chartqa)
    assert broken.reason == "bad_schema" and "'label'" in broken.detail


# ---------------------------------------------------------------- Basic-VLM pair


def test_basic_vlm_own_layout_with_image_map_beside(write_data):
    write_data("bv/image_map.json", {
        "a1.jpg": {"image_file": "a1.jpg", "ID": 0, "path": "/abs/ali/"},
        "c9.jpg": {"image_file": "c9.jpg", "ID": 1, "path": "/abs/coco/"},
        "lost.jpg": {"image_file": "lost.jpg", "ID": 5, "path": "/abs/"},
    })
    captions = write_data("bv/captions.json", {
        "0": {"q": "这幅图像描述了什么？<|extra_0|>", "a": "一只猫"},
        "1": {"q": "What is in the picture?", "a": ["a dog", "two dogs"]},
    })
    assert detect_format(captions) == "basic_vlm"
    out = samples_of(captions)
    assert out[0] == {"id": "0", "images": ["a1.jpg"], "messages": qa("这幅图像描述了什么？<image>", "一只猫")}
    assert out[1]["id"] == "1:0" and out[1]["messages"][0]["content"] == "<image>\nWhat is in the picture?"
    assert out[2]["messages"][1]["content"] == "two dogs"
    assert isinstance(out[3], SampleError) and "ID 5" in out[3].detail
    image_map = captions.with_name("image_map.json")
    assert detect_format(image_map) == "basic_vlm" and samples_of(image_map)[:3] == out[:3]


def test_basic_vlm_simple_layout_needs_its_image_map(write_data):
    image_map = write_data("maps/ids.json", {"17": "dog.jpg", "18": {"image_file": "cat.jpg"}})
    captions = write_data("pairs/captions.json", [{"image_id": 17, "caption": "a dog"},
                                                  {"image_id": 18, "captions": ["a cat", "one cat"]},
                                                  {"image_id": 19, "caption": "nobody"}])
    assert detect_format(captions) == "ai_challenger"  # no image map known: the AI Challenger shape
    assert detect_format(captions, image_map=str(image_map)) == "basic_vlm"
    out = samples_of(captions, image_map=str(image_map), caption_mode="sample", seed=0, prompt="What is this?")
    assert out[0] == {"id": "17", "images": ["dog.jpg"], "messages": qa("<image>\nWhat is this?", "a dog")}
    assert out[1]["images"] == ["cat.jpg"] and out[1]["messages"][1]["content"] in ("a cat", "one cat")
    assert out[2].reason == "bad_schema"
    with pytest.raises(ValueError, match="image map"):
        samples_of(captions, format="basic_vlm")


# ---------------------------------------------------------------- detection


def test_undetectable_and_ambiguous_files_name_the_file_and_formats_tried(write_data, make_llava_record):
    unknown = write_data("mystery.json", [{"foo": 1}])
    with pytest.raises(ValueError) as info:
        detect_format(unknown)
    message = str(info.value)
    assert "mystery.json" in message and "no format matches" in message
    assert all(name in message for name in FORMATS)
    both = write_data("both.json", [{**make_llava_record("a"), "query": "q", "label": "l"}])
    with pytest.raises(ValueError, match=r"several formats match \(llava, qa_table\)"):
        detect_format(both)
    assert samples_of(both, format="llava")[0]["id"] == "a"  # the override decides
    empty = write_data("empty.json", [])
    with pytest.raises(ValueError, match="empty.json"):
        samples_of(empty)
    assert samples_of(empty, format="llava") == []
    with pytest.raises(ValueError, match="starts with"):
        detect_format(write_data("notes.txt", "hello"))


def test_format_override_and_option_checks(write_data):
    path = write_data("aic.json", AIC[:1])
    assert len(samples_of(path, format="ai_challenger", caption_mode="sample")) == 1
    with pytest.raises(ValueError, match="takes no option"):
        samples_of(path, format="llava", prompt="x")
    with pytest.raises(ValueError, match="unknown data format"):
        samples_of(path, format="parquet")


# ---------------------------------------------------------------- streaming JSON


def test_json_array_streams_across_chunk_boundaries(tmp_path):
    values = [{"text": "猫" * k, "n": 10**k} for k in range(1, 30)] + [12345678901234567890, "end"]
    path = tmp_path / "a.json"
    path.write_text(" \n[ " + " ,\n".join(json.dumps(v, ensure_ascii=False) for v in values) + " ]\n", encoding="utf-8")
    for chunk in (1, 3, 7, 64, 1 << 20):
        assert list(iter_json_array(path, chunk_chars=chunk)) == values
    lines_in_json = tmp_path / "lines.json"  # JSON Lines under a .json name
    lines_in_json.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n' * 3)
    assert detect_format(lines_in_json) == "llava" and len(samples_of(lines_in_json)) == 3
    broken = tmp_path / "broken.json"
    broken.write_text('[{"a": 1}, {"b": ]', encoding="utf-8")
    it = iter_json_array(broken, chunk_chars=4)
    assert next(it) == {"a": 1}
    with pytest.raises(ValueError, match="broken JSON in element 1"):
        next(it)
