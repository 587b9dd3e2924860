"""Benchmark: batched greedy generation against one prompt at a time, and ours against transformers' `generate`.

    python bench/generate.py                       # 42M model, 16 prompts, batch 8, 32 new tokens, 5 rounds
    python bench/generate.py --size small --prompts 4 --batch 2 --repeats 1 --no-record      # a smoke test

Same weights (one llava-hf folder loaded by each side) and the same prompts (one image + 20-60 text ids each).
Every answer runs to `--max_new_tokens` (no stop id), so each side generates the same number of tokens and the
figure is generated tokens per second. Sides run in turn (A B C A B C ...) on `--threads` torch threads:
- ours, one by one: vlm's decode loop with one prompt per call;
- ours, batched: the same loop with `--batch` left-padded prompts per call;
- transformers: `LlavaForConditionalGeneration.generate` on the same left-padded batches.
The greedy answers of all three are checked to be the same ids.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SIZES, append_result, load_average, load_models, save_reference_folder, summarise  # noqa: E402


def make_prompts(n: int, *, vocab: int, image_token_id: int, num_image_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, image_token_id) for _ in range(3)] + [image_token_id] * num_image_tokens
            + [rng.randrange(10, image_token_id) for _ in range(rng.randrange(20, 61))] for _ in range(n)]


def workload(size: str, n: int, *, dtype: str = "float32", device: str = "cpu", reference: bool = True):
    """(ours, transformers' LLaVA or None, n prompts, their (n, 3, H, W) pixels): the same weights on both sides."""
    import tempfile

    import torch

    s = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        save_reference_folder(tmp, size)
        ours = load_models(tmp, "ours").to(device, getattr(torch, dtype)).eval()
        ref = load_models(tmp, "reference").to(device, getattr(torch, dtype)).eval() if reference else None
    prompts = make_prompts(n, vocab=s["vocab"], image_token_id=s["vocab"] - 1, num_image_tokens=num_image_tokens(size))
    pixels = torch.randn(n, 3, s["image_size"], s["image_size"],
                         generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    return ours, ref, prompts, pixels


def num_image_tokens(size: str) -> int:
    return (SIZES[size]["image_size"] // SIZES[size]["patch"]) ** 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="42m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    import torch
    from transformers import GenerationConfig

    from vlm.generate.decoding import GenerationSettings, generate_ids
    from vlm.processing import left_pad

    torch.set_num_threads(args.threads)
    ours, ref, prompts, pixels = workload(args.size, args.prompts, dtype=args.dtype, device=args.device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    chunks = [range(i, min(i + args.batch, len(prompts))) for i in range(0, len(prompts), args.batch)]

    def ours_one_by_one() -> list[list[int]]:
        return [generate_ids(ours, [prompts[i]], pixels[i:i + 1], stop_ids=[], pad_token_id=0, settings=settings)[0]
                for i in range(len(prompts))]

    def ours_batched() -> list[list[int]]:
        return [row for c in chunks for row in generate_ids(ours, [prompts[i] for i in c], pixels[c.start:c.stop],
                                                            stop_ids=[], pad_token_id=0, settings=settings)]

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)

    @torch.no_grad()
    def transformers_batched() -> list[list[int]]:
        rows = []
        for c in chunks:
            ids, mask = left_pad([prompts[i] for i in c], 0)
            out = ref.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                               pixel_values=pixels[c.start:c.stop].to(args.device), generation_config=config)
            rows += out[:, ids.shape[1]:].tolist()
        return rows

    sides = {"ours, one by one": ours_one_by_one, f"ours, batch {args.batch}": ours_batched,
             f"transformers, batch {args.batch}": transformers_batched}
    answers = {name: run() for name, run in sides.items()}  # warm-up, and the answers to compare
    first = next(iter(answers.values()))
    agree = {name: sum(a == b for a, b in zip(rows, first)) for name, rows in answers.items()}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    tokens = len(prompts) * args.max_new_tokens
    for repeat in range(args.repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            rates[name].append(tokens / (time.perf_counter() - start))
            print(f"run {repeat + 1} {name:<24} {rates[name][-1]:8.1f} tokens/s  load {load_average()}", flush=True)
    medians = {name: summarise(r)[1] for name, r in rates.items()}
    one, batched, theirs = medians.values()
    table = ["| side | tokens/s min | tokens/s median | answers equal to one-by-one |", "| --- | --- | --- | --- |"]
    table += [f"| {name} | {summarise(r)[0]:.1f} | {summarise(r)[1]:.1f} | {agree[name]}/{len(prompts)} |"
              for name, r in rates.items()]
    table += [f"| batched / one by one (median) | | {batched / one:.2f}x | |",
              f"| ours / transformers, batched (median) | | {batched / theirs:.2f}x | |"]
    print("\n".join(table))
    if not args.no_record:
        append_result("Generation throughput (issue 12)", "python bench/generate.py " + " ".join(sys.argv[1:]), table,
                      [f"{len(prompts)} prompts of {num_image_tokens(args.size)} image + 23-63 text tokens, "
                       f"{args.max_new_tokens} new tokens each, greedy, {args.threads} thread(s), {args.dtype} on "
                       f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
