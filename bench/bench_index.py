"""Benchmark: index a LLaVA-665K-sized file with `SupervisedDataset`; time and peak memory.

    python bench/bench_index.py                  # 665,000 records, ~1 GB, in a temp dir
    python bench/bench_index.py --records 50000  # quicker
    python bench/bench_index.py --check_samples 10000   # also time `check_dataset` on 10K samples

Generates a LLaVA-style JSON array resembling `llava_v1_5_mix665k.json` (realistic mix: ~20%
text-only ShareGPT-like chats with long replies, short multi-question VQA, multi-turn conversations,
detailed descriptions; ~80% with an image; ~1.5 KB per record), then builds the dataset in a child
process, so its peak RSS (`ru_maxrss`) is the indexing's own and not the generator's. Prints the
index time, the peak RSS and the child's RSS right after its imports (torch, transformers).
Targets: index < 30 s, peak RSS < 2 GB.

With `--check_samples N`, the first N records also get an image file each (hard links to one tiny
PNG) and `check_dataset(check_images="exists")` runs on them with a small BPE tokenizer, which is the
`vlm data check --check_images exists` path; its time is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a of and to in is what color shape image picture shows left right top bottom person people man woman "
    "car street building sign text number table chart value bar line highest lowest red green blue white black "
    "yellow small large two three many there are this that with on near behind front background foreground "
    "describe detail answer question brief word phrase explain why how where when which object scene sky tree"
).split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choices(WORDS, k=n_words))


def make_record(k: int, rng: random.Random) -> dict:
    """One LLaVA-style record; the kind is drawn to resemble the 665K mix."""
    kind = rng.random()
    if kind < 0.2:  # ShareGPT-like text-only chat
        turns = [(_text(rng, rng.randint(8, 40)), _text(rng, rng.randint(80, 250))) for _ in range(rng.randint(1, 3))]
        image = None
    elif kind < 0.5:  # VQA: many short questions about one image
        turns = [(_text(rng, rng.randint(4, 10)) + "?", _text(rng, rng.randint(1, 3))) for _ in range(rng.randint(3, 10))]
        image = f"vqa/{k:012d}.jpg"
    elif kind < 0.8:  # LLaVA-Instruct conversation
        turns = [(_text(rng, rng.randint(6, 16)) + "?", _text(rng, rng.randint(30, 110))) for _ in range(rng.randint(1, 4))]
        image = f"coco/train2017/{k:012d}.jpg"
    else:  # detailed description
        turns = [(_text(rng, rng.randint(6, 12)), _text(rng, rng.randint(80, 180)))]
        image = f"gqa/images/{k}.jpg"
    conversations = []
    for t, (question, answer) in enumerate(turns):
        if t == 0 and image:
            question = f"<image>\n{question}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record = {"id": f"{k:012d}"}
    if image:
        record["image"] = image
    record["conversations"] = conversations
    return record


def generate(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for k in range(records):
            f.write((",\n" if k else "") + json.dumps(make_record(k, rng), indent=1))
        f.write("\n]\n")


def measure(path: str, check_samples: int, image_folder: str) -> None:
    """Child process: build the dataset, print one JSON line of figures."""
    from vlm.data.dataset import SupervisedDataset
    from vlm.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([], vocab_size=300)
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    dataset = SupervisedDataset(path, tokenizer, "vicuna_v1", None, image_folder=image_folder, num_image_tokens=576)
    seconds = time.perf_counter() - start
    figures = {"records": len(dataset), "index_s": round(seconds, 2), "imports_rss": imports_rss,
               "with_image": round(sum(dataset.has_image) / len(dataset), 3),
               "mean_length_estimate": round(sum(dataset.lengths) / len(dataset))}
    figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if check_samples:
        from vlm.data.check import check_dataset

        texts = [m["content"] for i in range(200) for m in dataset.records[i][0]["messages"]]
        tokenizer = build_tokenizer(texts, vocab_size=1024)
        subset = [dataset.records[i][0] for i in range(check_samples)]
        start = time.perf_counter()
        _, report = check_dataset(subset, image_folder=image_folder, tokenizer=tokenizer, num_image_tokens=576,
                                  max_length=4096, check_images="exists")
        figures["check_samples"] = check_samples
        figures["check_s"] = round(time.perf_counter() - start, 2)
        figures["check_dropped"] = report["dropped"]
    print(json.dumps(figures))


def link_images(data: Path, folder: Path, count: int) -> None:
    """Give the first `count` records' images a file (hard links to one tiny PNG)."""
    from PIL import Image

    template = folder / "_one.png"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), "red").save(template)
    from vlm.data.formats.source import iter_json_array

    for k, record in enumerate(iter_json_array(data)):
        if k >= count:
            break
        if "image" in record:
            target = folder / record["image"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(template, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--data", default=None, help="reuse this generated file instead of writing a new one")
    parser.add_argument("--check_samples", type=int, default=0, help="also time check_dataset on this many samples")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--image_folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.measure, args.check_samples, args.image_folder)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "llava_like.json"
        if not args.data:
            start = time.perf_counter()
            generate(data, args.records)
            print(f"generated {args.records} records, {data.stat().st_size / 2**20:.0f} MiB, "
                  f"in {time.perf_counter() - start:.1f} s")
        images = Path(tmp) / "images"
        if args.check_samples:
            link_images(data, images, args.check_samples)
        child = [sys.executable, __file__, "--measure", str(data), "--check_samples", str(args.check_samples),
                 "--image_folder", str(images)]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        figures = json.loads(out.strip().splitlines()[-1])
    gib = 2**30
    print(f"indexed {figures['records']} records in {figures['index_s']:.1f} s "
          f"({figures['with_image']:.0%} with image, mean length estimate {figures['mean_length_estimate']} tokens)")
    print(f"peak RSS {figures['peak_rss'] / gib:.2f} GiB (after imports: {figures['imports_rss'] / gib:.2f} GiB)")
    if "check_s" in figures:
        print(f"check_dataset on {figures['check_samples']} samples (check_images=exists): {figures['check_s']:.1f} s, "
              f"dropped {figures['check_dropped'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
