"""Benchmark: samples per second of one data worker, ours against transformers' LLaVA image processor.

    python bench/data.py                          # 48 JPEGs 640x480 -> 336 px, 5 interleaved runs each
    python bench/data.py --n 8 --repeats 1 --no-record      # a smoke test

One DataLoader worker is one process on one thread, so both sides run here on 1 torch thread, in turn (A B A
B ...), over the same files:
- ours: a training sample as `SupervisedDataset.__getitem__` makes it: decode the JPEG, pad to square with the
  mean colour, resize to 336, normalise, render the conversation (LLaVA-1.5 `v1`), tokenise, expand `<image>`
  to 576 ids and build the labels (each sample's answer differs; the template's system prompt repeats);
- reference: PIL decode + `LlavaImageProcessor` (pad to square, resize, centre crop, normalise; transformers'
  PIL backend, since torchvision's CPU wheel does not load with torch 2.13 here) + the tokenizer on the same
  rendered text (no system prompt, no labels: the reference does less work than ours);
- the image halves of both alone (`ours_image`, `reference_image`): decode + image processor, no text.
Each run is timed in wall time and in this process's CPU time (`time.process_time`); on a shared machine the
CPU time is the steadier of the two (other processes' work is not counted, though they still share caches).

Before timing, every image's pixel_values from ours (the dataset's sample) are compared with the reference's:
they must be equal bit for bit (`pixels equal: n/n`), as tests/test_processor.py requires. JPEG draft decoding
(`ImageProcessor.load(..., draft=True)`) is opt-in and not used here: it moves pixels, and no libjpeg scale fits
640x480 -> 336 anyway (1/2 gives 320 < 336).

`--split` adds where one sample's CPU time goes, each stage timed inside one loop over the files: ours decoding
(`load_image`), the geometry (`ImageProcessor._geometry`: pad + Pillow's two resampling passes), the
normalisation, the text (checks, tokenise, labels, tensors); the reference's decode, `LlavaImageProcessor` and
tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_result, load_average, summarise  # noqa: E402

SIZE = 336
QUESTION = "<image>\nWhat is shown in this picture? Describe the main objects and their colours."
ANSWER = "A red circle on the left, a blue square in the middle and a green triangle at the bottom right."


def answer(i: int) -> str:
    """Sample i's answer: each sample's text differs, as in real data (only the template's prompt repeats)."""
    return f"{ANSWER} There are {i + 3} objects in picture {i}."


def write_images(folder: str, n: int) -> list[str]:
    """`n` 640x480 JPEGs (quality 90) with smooth shapes and noise, so they compress like photos."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    names = []
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        base = (np.sin(xx / (20 + i)) + np.cos(yy / (15 + 2 * i)))[..., None] * 60 + 128
        pixels = np.clip(base + rng.normal(0, 12, (480, 640, 3)) + rng.integers(0, 60, 3), 0, 255).astype("uint8")
        name = f"img{i:03d}.jpg"
        Image.fromarray(pixels).save(os.path.join(folder, name), quality=90)
        names.append(name)
    return names


def ours(folder: str, names: list[str], tokenizer):
    from transformers import CLIPVisionConfig

    from vlm.data.dataset import SupervisedDataset
    from vlm.data.mix import MixedRecords, Source
    from vlm.visual.processor import ImageProcessor

    data = os.path.join(folder, "data.json")
    with open(data, "w", encoding="utf-8") as f:
        json.dump([{"id": str(i), "image": name, "conversations": [{"from": "human", "value": QUESTION},
                                                                   {"from": "gpt", "value": answer(i)}]}
                   for i, name in enumerate(names)], f)
    vision = CLIPVisionConfig(image_size=SIZE, patch_size=14)
    processor = ImageProcessor.from_vision_config(vision, aspect_ratio="pad")
    records = MixedRecords([Source(path=data, image_folder=folder)], seed=0)
    dataset = SupervisedDataset(records, tokenizer, "v1", processor, num_image_tokens=(SIZE // 14) ** 2,
                                max_length=2048)

    def run() -> None:
        for i in range(len(dataset)):
            dataset[i]
    run.dataset = dataset  # for check_pixels
    return run


def ours_image(folder: str, names: list[str], tokenizer):
    """The image half of `ours` alone: `load_image` + our processor (pad, resize, normalise)."""
    from transformers import CLIPVisionConfig

    from vlm.visual.processor import ImageProcessor, load_image

    processor = ImageProcessor.from_vision_config(CLIPVisionConfig(image_size=SIZE, patch_size=14), aspect_ratio="pad")

    def run() -> None:
        for name in names:
            processor(load_image(os.path.join(folder, name)), return_tensors="pt")
    return run


def reference_image(folder: str, names: list[str], tokenizer):
    """The image half of `reference` alone: PIL decode + LlavaImageProcessor."""
    from PIL import Image

    processor = reference_processor()

    def run() -> None:
        for name in names:
            with Image.open(os.path.join(folder, name)) as image:
                processor(images=image.convert("RGB"), return_tensors="pt")
    return run


def reference(folder: str, names: list[str], tokenizer):
    from PIL import Image

    processor = reference_processor()
    texts = [f"USER: {QUESTION} ASSISTANT: {answer(i)}</s>" for i in range(len(names))]

    def run() -> None:
        for name, text in zip(names, texts):
            with Image.open(os.path.join(folder, name)) as image:
                processor(images=image.convert("RGB"), return_tensors="pt")
            tokenizer(text)
    return run


def check_pixels(folder: str, names: list[str], tokenizer) -> tuple[int, int]:
    """(images whose pixel_values from our dataset sample equal the reference processor's bit for bit, images)."""
    import torch
    from PIL import Image

    run = ours(folder, names, tokenizer)
    dataset = run.dataset
    processor = reference_processor()
    equal = 0
    for index, name in enumerate(names):
        with Image.open(os.path.join(folder, name)) as image:
            expected = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        equal += bool(torch.equal(dataset[index]["pixel_values"], expected))
    return equal, len(names)


class StageTimes:
    """CPU time per named stage, summed over calls (`time.process_time`, this process only)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def run(self, stage: str, work, *args):
        start = time.process_time()
        result = work(*args)
        self.total[stage] = self.total.get(stage, 0.0) + time.process_time() - start
        return result


def split_sides(folder: str, names: list[str], tokenizer, stages: dict[str, list[float]]) -> dict:
    """`--split`: our sample and the reference's, each stage timed inside the same loop over the files (so the
    stages share its conditions); each run appends its CPU ms per sample by stage to `stages`."""
    import numpy as np
    import torch
    from PIL import Image

    from vlm.data.check import check_sample
    from vlm.visual.processor import load_image

    dataset = ours(folder, names, tokenizer).dataset
    processor, reference = dataset.image_processor, reference_processor()
    size = processor.config.image_size
    items = [dataset.record(i) for i in range(len(dataset))]
    texts = [f"USER: {QUESTION} ASSISTANT: {answer(i)}</s>" for i in range(len(names))]

    def encode(item, folder_):  # what the dataset does besides the image: checks, tokens, labels, tensors
        encoded, _ = check_sample(item, folder_, dataset.tokenizer, dataset.template, image_check="none",
                                  num_image_tokens=dataset.num_image_tokens, max_length=dataset.max_length)
        return torch.from_numpy(np.array(encoded.input_ids)), torch.from_numpy(np.array(encoded.labels))

    def normalise(image) -> None:
        pixels = np.empty((1, 3, size, size), dtype=np.float32)
        processor._normalise_into(image, pixels[0])
        torch.from_numpy(pixels)

    def split_ours() -> None:
        times = StageTimes()
        for (item, folder_, _), name in zip(items, names):
            image = times.run("ours: decode (load_image)", load_image, os.path.join(folder, name))
            shaped = times.run("ours: geometry (pad; Pillow's two resize passes)", processor._geometry, image)
            times.run("ours: normalise (Image.point per channel) + tensor", normalise, shaped)
            times.run("ours: text (checks, tokenise, labels, tensors)", encode, item, folder_)
        for stage, seconds in times.total.items():
            stages.setdefault(stage, []).append(seconds / len(names) * 1e3)

    def decode_reference(path):
        with Image.open(path) as image:
            return image.convert("RGB")

    def split_reference() -> None:
        times = StageTimes()
        for name, text in zip(names, texts):
            image = times.run("transformers: decode (PIL open + convert)", decode_reference, os.path.join(folder, name))
            times.run("transformers: LlavaImageProcessor (pad, resize, crop, rescale, normalise)", reference, image)
            times.run("transformers: tokenizer", tokenizer, text)
        for stage, seconds in times.total.items():
            stages.setdefault(stage, []).append(seconds / len(names) * 1e3)

    return {"split_ours": split_ours, "split_reference": split_reference}


def reference_processor():
    from transformers import LlavaImageProcessor

    return LlavaImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                               do_pad=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="images per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--split", action="store_true", help="also time our stages (decode, geometry, normalise, text)")
    parser.add_argument("--note", default="", help="a line added under the recorded table (e.g. which code ran)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    import torch

    from vlm.data.tokenizer import build_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_images(tmp, args.n)
        tokenizer = build_tokenizer([QUESTION, ANSWER, answer(0)], vocab_size=400)
        equal, total = check_pixels(tmp, names, tokenizer)
        print(f"pixels equal (ours vs LlavaImageProcessor, bit for bit): {equal}/{total}", flush=True)
        sides = {name: build(tmp, names, tokenizer) for name, build in (
            ("ours", ours), ("reference", reference), ("ours_image", ours_image), ("reference_image", reference_image))}
        stages: dict[str, list[float]] = {}  # --split: CPU ms per sample of each stage, one entry per run
        if args.split:
            sides.update(split_sides(tmp, names, tokenizer, stages))
        wall: dict[str, list[float]] = {name: [] for name in sides}  # samples/s
        cpu: dict[str, list[float]] = {name: [] for name in sides}  # CPU ms per sample
        for side in sides.values():  # warm-up: imports, first-call caches
            side()
        for repeat in range(args.repeats):
            for name, run in sides.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                cpu[name].append((time.process_time() - start_cpu) / args.n * 1e3)
                wall[name].append(args.n / (time.perf_counter() - start))
                print(f"run {repeat + 1} {name:<22} {wall[name][-1]:7.1f} samples/s  {cpu[name][-1]:6.2f} CPU ms/sample"
                      f"  load {load_average()}", flush=True)
    table = ["| side | samples/s min | samples/s median | CPU ms/sample min | CPU ms/sample median |",
             "| --- | --- | --- | --- | --- |"]
    for name, label in (("ours", "ours (full sample)"), ("reference", "transformers LlavaImageProcessor + tokenizer"),
                        ("ours_image", "ours, image only (load_image + ImageProcessor)"),
                        ("reference_image", "transformers, image only (PIL decode + LlavaImageProcessor)")):
        low, mid = summarise(wall[name])
        cpu_low, cpu_mid = summarise(cpu[name])
        table.append(f"| {label} | {low:.1f} | {mid:.1f} | {cpu_low:.2f} | {cpu_mid:.2f} |")
    for ours_name, reference_name, what in (("ours", "reference", "full sample"), ("ours_image", "reference_image", "image only")):
        ratio = summarise(wall[ours_name])[1] / summarise(wall[reference_name])[1]
        cpu_ratio = summarise(cpu[reference_name])[0] / summarise(cpu[ours_name])[0]
        table.append(f"| ratio ours/reference, {what} (wall: median; CPU: min) | | {ratio:.2f}x | {cpu_ratio:.2f}x | |")
    notes = [f"Pixels equal to LlavaImageProcessor's, bit for bit: {equal}/{total} images."]
    if args.split:
        notes += ["", "Where one sample's CPU time goes (ms; each stage timed inside one loop over the files; median "
                  "over the runs, the warm-up run left out):", "", "| stage | CPU ms/sample |", "| --- | --- |"]
        for stage, values in stages.items():
            notes.append(f"| {stage} | {statistics.median(values[1:] or values):.2f} |")
    notes += [args.note] if args.note else []
    print("\n".join(table + [""] + notes))
    if not args.no_record:
        append_result("Data worker throughput, 640x480 JPEG -> 336 px (issue 12)",
                      "python bench/data.py " + shlex.join(sys.argv[1:]), table, notes)
    return 0 if equal == total else 1


if __name__ == "__main__":
    sys.exit(main())
