"""Benchmark: one DPO training step, answers scored at their positions only (the default) vs from full logits.

    python bench/dpo_logps.py                        # 42M model (32K vocabulary), 2 pairs, 3 interleaved runs each
    python bench/dpo_logps.py --size small --repeats 1 --steps 1 --no-record      # a smoke test

A step is what `vlm.train.dpo.DPOTrainer` does: the reference (a frozen copy) scores the 2B rows under no_grad, the
policy scores them (one forward, each image encoded once) and DPO's sigmoid loss is backpropagated, then AdamW.
`answer` is `forward(answer_labels=...)` with the LM head at the answer positions only (`vlm.llm.loss.
answer_log_probs`); `full` the same with `--supervised_only_loss False`: (2B, T, V) logits and their log-softmax.
The pairs: prompts from the LLaVA-665K-like length mix of bench/train.py (80% one image, median 372 tokens), each
with its answer (chosen) and another answer of a similar length (rejected). Each run is a fresh process; runs
alternate. Figures: peak RSS growth during the timed steps over the resident size before them, and seconds per
step (both minimum and median over the runs); the first step's answer log-probs must agree between the two.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # vlm, from a checkout

from common import (SIZES, append_result, emit, length_mix, load_average, load_models, padded_batch,  # noqa: E402
                    parse_result, PeakRss, rss_mib, save_reference_folder, summarise)

MODES = ("answer", "full")


def pair_batch(examples, image_size: int, seed: int) -> dict:
    """2B rows: each example (chosen), then the same prompts with another answer of similar length (rejected)."""
    import random

    from common import Example

    rng = random.Random(seed)
    rejected = []
    for e in examples:
        answer_start = next(i for i, label in enumerate(e.labels) if label != -100)
        answer = [rng.randrange(10, max(e.input_ids) + 1) for _ in range(len(e.input_ids) - answer_start)]
        rejected.append(Example(e.input_ids[:answer_start] + answer, [-100] * answer_start + answer, e.has_image))
    batch = padded_batch(list(examples) + rejected, image_size)
    n = sum(e.has_image for e in examples)  # the chosen rows' images: the model repeats them for the rejected ones
    if n:
        batch["pixel_values"] = batch["pixel_values"][:n]
    return batch


def worker(args: argparse.Namespace) -> None:
    import torch

    from vlm.train.dpo import DPOSettings, dpo_loss, pair_log_probs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = SIZES[args.size]
    model = load_models(args.folder, "ours").train()
    model.supervised_only_loss = args.worker == "answer"
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    image_token_id, num_image_tokens = s["vocab"] - 1, (s["image_size"] // s["patch"]) ** 2
    data = length_mix(args.pairs * (1 + args.steps), vocab=s["vocab"], image_token_id=image_token_id,
                      num_image_tokens=num_image_tokens)
    batches = [pair_batch(data[i:i + args.pairs], s["image_size"], seed=i) for i in range(0, len(data), args.pairs)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    settings, losses, times, scores = DPOSettings(), [], [], []

    def step(batch: dict) -> None:
        b = batch["input_ids"].shape[0] // 2
        with torch.no_grad():
            ref, _ = pair_log_probs(reference, batch)
        logps, counts = pair_log_probs(model, batch)
        scores.append(logps.detach().tolist())
        loss, _, _ = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], settings, chosen_num_tokens=counts[:b],
                              rejected_num_tokens=counts[b:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    step(batches[0])  # warm-up: the optimizer's state is allocated here, not in the measured peak
    base = rss_mib()
    with PeakRss() as peak:
        for batch in batches[1:]:
            start = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - start)
    emit({"first_logps": scores[0], "peak_growth_mib": peak.peak - base, "s_per_step": sorted(times)[len(times) // 2],
          "rows": int(batches[1]["input_ids"].shape[0]), "width": int(batches[1]["input_ids"].shape[1])})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="42m", choices=sorted(SIZES))
    parser.add_argument("--pairs", type=int, default=2, help="pairs per step (2x rows)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    results = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as folder:
        save_reference_folder(folder, args.size)
        for run in range(args.repeats):
            for mode in MODES:
                cmd = [sys.executable, __file__, "--worker", mode, "--folder", folder, "--size", args.size,
                       "--pairs", str(args.pairs), "--steps", str(args.steps), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                                str(args.threads)})
                result = parse_result(out.stdout + out.stderr)
                results[mode].append(result)
                print(f"run {run + 1} {mode}: {result}", flush=True)
    first = {mode: results[mode][0]["first_logps"] for mode in MODES}
    # the same pairs, the same answer log-probs (the loss itself is log 2 at the first step: policy = reference)
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(first["answer"], first["full"])), first
    table = ["| answers scored | peak growth MiB min | median | s/step min | median |",
             "| --- | --- | --- | --- | --- |"]
    for mode in MODES:
        memory, seconds = summarise([r["peak_growth_mib"] for r in results[mode]]), summarise(
            [r["s_per_step"] for r in results[mode]])
        table.append(f"| {mode} | {memory[0]:.0f} | {memory[1]:.0f} | {seconds[0]:.2f} | {seconds[1]:.2f} |")
    median = {m: summarise([r["peak_growth_mib"] for r in results[m]])[1] for m in MODES}
    speed = {m: summarise([r["s_per_step"] for r in results[m]])[1] for m in MODES}
    table.append(f"| answer / full | | {median['answer'] / median['full']:.2f}x | | "
                 f"{speed['answer'] / speed['full']:.2f}x |")
    print("\n".join(table))
    if not args.no_record:
        r = results["answer"][0]
        append_result("DPO step: answer positions only vs full logits (issue 13)",
                      " ".join(["python bench/dpo_logps.py", *sys.argv[1:]]), table,
                      [f"{args.size} model, {args.pairs} pairs = {r['rows']} rows of {r['width']} tokens (padded), "
                       f"{args.steps} timed steps after a warm-up, {args.threads} thread(s), {args.repeats} "
                       f"interleaved runs each; first-step answer log-probs equal to 1e-4 ({first['answer'][0]:.4f} / "
                       f"{first['full'][0]:.4f} for the first row). "
                       f"Load at the end {load_average()}: a shared 2-core machine; memory is the figure to read."])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
