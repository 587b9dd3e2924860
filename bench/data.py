"""Benchmark: samples per second of one data worker, ours against transformers' LLaVA image processor.

    python bench/data.py                          # 48 JPEGs 640x480 -> 336 px, 5 interleaved runs each
    python bench/data.py --n 8 --repeats 1 --no-record      # a smoke test

One DataLoader worker is one process on one thread, so both sides run here on 1 torch thread, in turn (A B A
B ...), over the same files:
- ours: a training sample as `SupervisedDataset.__getitem__` makes it: decode the JPEG, pad to square with the
  mean colour, resize to 336, normalise, render the conversation (LLaVA-1.5 `v1`), tokenise, expand `<image>`
  to 576 ids and build the labels;
- reference: PIL decode + `LlavaImageProcessor` (pad to square, resize, centre crop, normalise; transformers'
  PIL backend, since torchvision's CPU wheel does not load with torch 2.13 here) + the tokenizer on the same
  rendered text (no labels: the reference does less work than ours);
- the image halves of both alone (`ours_image`, `reference_image`): decode + image processor, no text.
Our pixels equal the reference's bit for bit (tests/test_processor.py); JPEG draft decoding
(`ImageProcessor.load(..., draft=True)`) is opt-in and not used here (no scale fits 640x480 -> 336 anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_result, load_average, summarise  # noqa: E402

SIZE = 336
QUESTION = "<image>\nWhat is shown in this picture? Describe the main objects and their colours."
ANSWER = "A red circle on the left, a blue square in the middle and a green triangle at the bottom right."


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
                                                                   {"from": "gpt", "value": ANSWER}]}
                   for i, name in enumerate(names)], f)
    vision = CLIPVisionConfig(image_size=SIZE, patch_size=14)
    processor = ImageProcessor.from_vision_config(vision, aspect_ratio="pad")
    records = MixedRecords([Source(path=data, image_folder=folder)], seed=0)
    dataset = SupervisedDataset(records, tokenizer, "v1", processor, num_image_tokens=(SIZE // 14) ** 2,
                                max_length=2048)

    def run() -> None:
        for i in range(len(dataset)):
            dataset[i]
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
    from transformers import LlavaImageProcessor

    processor = LlavaImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                    do_pad=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                    image_std=[0.26862954, 0.26130258, 0.27577711])

    def run() -> None:
        for name in names:
            with Image.open(os.path.join(folder, name)) as image:
                processor(images=image.convert("RGB"), return_tensors="pt")
    return run


def reference(folder: str, names: list[str], tokenizer):
    from PIL import Image
    from transformers import LlavaImageProcessor

    processor = LlavaImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                    do_pad=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                    image_std=[0.26862954, 0.26130258, 0.27577711])
    text = f"USER: {QUESTION} ASSISTANT: {ANSWER}</s>"

    def run() -> None:
        for name in names:
            with Image.open(os.path.join(folder, name)) as image:
                processor(images=image.convert("RGB"), return_tensors="pt")
            tokenizer(text)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="images per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    import torch

    from vlm.data.tokenizer import build_tokenizer

    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {"ours": [], "reference": [], "ours_image": [], "reference_image": []}
    with tempfile.TemporaryDirectory() as tmp:
        names = write_images(tmp, args.n)
        tokenizer = build_tokenizer([QUESTION, ANSWER], vocab_size=400)
        sides = {name: build(tmp, names, tokenizer) for name, build in (
            ("ours", ours), ("reference", reference), ("ours_image", ours_image), ("reference_image", reference_image))}
        for side in sides.values():  # warm-up: imports, first-call caches
            side()
        for repeat in range(args.repeats):
            for name, run in sides.items():
                start = time.perf_counter()
                run()
                rates[name].append(args.n / (time.perf_counter() - start))
                print(f"run {repeat + 1} {name:<15} {rates[name][-1]:7.1f} samples/s  load {load_average()}", flush=True)
    table = ["| side | samples/s min | samples/s median |", "| --- | --- | --- |"]
    for name, label in (("ours", "ours (full sample)"), ("reference", "transformers LlavaImageProcessor + tokenizer"),
                        ("ours_image", "ours, image only (load_image + ImageProcessor)"),
                        ("reference_image", "transformers, image only (PIL decode + LlavaImageProcessor)")):
        low, mid = summarise(rates[name])
        table.append(f"| {label} | {low:.1f} | {mid:.1f} |")
    for ours_name, reference_name, what in (("ours", "reference", "full sample"), ("ours_image", "reference_image", "image only")):
        ratio = summarise(rates[ours_name])[1] / summarise(rates[reference_name])[1]
        table.append(f"| ratio ours/reference, {what} (median) | | {ratio:.2f}x |")
    print("\n".join(table))
    if not args.no_record:
        append_result("Data worker throughput, 640x480 JPEG -> 336 px (issue 12)",
                      "python bench/data.py " + " ".join(sys.argv[1:]), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
