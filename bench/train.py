"""Benchmark: training throughput and peak memory, ours against transformers' LlavaForConditionalGeneration.

    python bench/train.py                          # 42M model, batch 4, 5 interleaved runs each, appends to RESULTS.md
    python bench/train.py --size small --repeats 2 --steps 3 --no-record     # a smoke test (seconds)
    python bench/train.py --device cuda --dtype bfloat16                      # on a GPU
    python bench/train.py --packing                # ours on packed rows (the reference stays padded)
    python bench/train.py --full-logits-loss       # ours with the parent's full-logits loss (no supervised-only)

Same weights (one llava-hf folder, loaded by each side), same optimizer (AdamW, lr 1e-5), same batches (a
generated LLaVA-665K-like length mix: 80% one image, median 372 tokens, right-padded as the usual collator
does). Each run is a fresh process (`--worker`), runs A B A B ... alternate so that a change in the machine's
load hits both sides alike. The figure is non-padding tokens per second over the timed steps (after
`--warmup` steps); memory is the process's peak RSS growth over the model's resident size on CPU
(`torch.cuda.max_memory_allocated` on a GPU).

Ours trains as `train.py` does by default: loss only at supervised positions (`vlm.llm.loss`;
`--full-logits-loss` turns it off) and padded batches (`--packing`: the same samples packed into rows of at
most `--pack-length` tokens by `vlm.data.collate.PackingCollator`, the same images in the same order). Either
way the first-step losses of both sides must agree: the same samples, the same loss.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (SIZES, append_result, emit, length_mix, load_average, load_models, padded_batch,  # noqa: E402
                    packed, parse_result, PeakRss, rss_mib, save_reference_folder, summarise, training_flops)

SIDES = ("ours", "reference")


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = SIZES[args.size]
    dtype = getattr(torch, args.dtype)
    # torch_varlen is ours (vlm.llm.varlen); the reference gets transformers' SDPA, its fastest without flash-attn
    attn = "sdpa" if args.worker == "reference" and args.attn == "torch_varlen" else args.attn
    model = load_models(args.folder, args.worker, attn).to(device=args.device, dtype=dtype).train()
    image_token_id, num_image_tokens = s["vocab"] - 1, (s["image_size"] // s["patch"]) ** 2
    data = length_mix(args.batch * (args.warmup + args.steps), vocab=s["vocab"], image_token_id=image_token_id,
                      num_image_tokens=num_image_tokens)
    batches = [padded_batch(data[i:i + args.batch], s["image_size"]) for i in range(0, len(data), args.batch)]
    padding = 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["input_ids"].numel() for b in batches)
    counts = [int(b["attention_mask"].sum()) for b in batches]  # non-padding tokens, the same packed or padded
    if args.worker == "ours":
        model.supervised_only_loss = not args.full_logits_loss
        if args.packing:
            batches = [packed(b, args.pack_length, image_token_id, num_image_tokens) for b in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cuda = args.device.startswith("cuda")
    base = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    tokens, losses, start = 0, [], None
    with PeakRss() as rss:
        for step, (batch, n) in enumerate(zip(batches, counts)):
            loss = train_step(model, optimizer, batch, args)
            tokens, losses = tokens + n, losses + [loss]
            if step + 1 == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                tokens = 0
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak
    timed = data[args.batch * args.warmup:]
    emit({"tokens_per_s": tokens / seconds, "peak_growth_mib": peak - base, "first_loss": losses[0],
          "padding": padding, "tflops": training_flops(args.size, timed) / seconds / 1e12})


def train_step(model, optimizer, batch: dict, args: argparse.Namespace) -> float:
    """One optimizer step; returns the batch's loss."""
    import torch

    dtype = getattr(torch, args.dtype)
    batch = {k: (v.to(args.device, dtype) if k == "pixel_values" else v.to(args.device)) for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="42m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2", "torch_varlen"),
                        help="attention backend of both sides (torch_varlen: ours only; the reference runs sdpa)")
    parser.add_argument("--peak-tflops", type=float, default=989.4,
                        help="the device's dense bf16 peak for MFU (H100 SXM: 989.4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steady on a busy machine)")
    parser.add_argument("--packing", action="store_true", help="ours on packed rows (vlm's --packing)")
    parser.add_argument("--pack-length", type=int, default=2048, help="--packing: tokens per row (--model_max_length)")
    parser.add_argument("--full-logits-loss", action="store_true",
                        help="ours with the full-logits loss (vlm's --supervised_only_loss False)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        save_reference_folder(tmp, args.size)
        flags = [f"--{k}={v}" for k, v in (("size", args.size), ("batch", args.batch), ("steps", args.steps),
                                           ("warmup", args.warmup), ("device", args.device), ("dtype", args.dtype),
                                           ("threads", args.threads), ("pack-length", args.pack_length),
                                           ("attn", args.attn))]
        flags += ["--packing"] * args.packing + ["--full-logits-loss"] * args.full_logits_loss
        for repeat in range(args.repeats):
            for side in SIDES:
                done = subprocess.run([sys.executable, __file__, "--worker", side, "--folder", tmp, *flags],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
                result = parse_result(done.stdout)
                results[side].append(result)
                print(f"run {repeat + 1} {side:<9} {result['tokens_per_s']:9.1f} tokens/s  "
                      f"peak +{result['peak_growth_mib']:.0f} MiB  load {load_average()}", flush=True)
    ours, ref = ({k: summarise([r[k] for r in results[side]]) for k in ("tokens_per_s", "peak_growth_mib", "tflops")}
                 for side in SIDES)
    assert abs(results["ours"][0]["first_loss"] - results["reference"][0]["first_loss"]) < 1e-3, "losses differ"
    table = ["| side | tokens/s min | tokens/s median | peak growth MiB min | median | model TFLOP/s (median) | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for side, r in (("ours", ours), ("transformers LLaVA", ref)):
        table.append(f"| {side} | {r['tokens_per_s'][0]:.1f} | {r['tokens_per_s'][1]:.1f} | "
                     f"{r['peak_growth_mib'][0]:.0f} | {r['peak_growth_mib'][1]:.0f} | {r['tflops'][1]:.2f} | "
                     f"{r['tflops'][1] / args.peak_tflops:.1%} |" if args.device.startswith("cuda") else
                     f"{r['peak_growth_mib'][0]:.0f} | {r['peak_growth_mib'][1]:.0f} | {r['tflops'][1]:.2f} | - |")
    table.append(f"| ratio ours/reference (median) | | {ours['tokens_per_s'][1] / ref['tokens_per_s'][1]:.2f}x | | "
                 f"{ours['peak_growth_mib'][1] / ref['peak_growth_mib'][1]:.2f}x | | |")
    ours_mode = (f"ours: {'packed rows of <= ' + str(args.pack_length) + ' tokens' if args.packing else 'padded'}, "
                 f"{'full-logits' if args.full_logits_loss else 'supervised-only'} loss. ")
    ours_mode += f"{args.dtype}, {args.attn} attention on {args.device}. "
    if args.device.startswith("cuda"):
        import torch

        ours_mode += (f"GPU: {torch.cuda.get_device_name()}; MFU = model FLOPs (`bench/common.py:training_flops`) / "
                      f"time / {args.peak_tflops} TFLOP/s. ")
    notes = [ours_mode + f"Padding share of the padded batches: {results['ours'][0]['padding']:.0%}; "
             f"first-step loss ours "
             f"{results['ours'][0]['first_loss']:.4f}, reference {results['reference'][0]['first_loss']:.4f}."]
    print("\n".join(table + notes))
    if not args.no_record:
        append_result("Training throughput, ours vs transformers LLaVA (issue 12)",
                      "python bench/train.py " + " ".join(sys.argv[1:]), table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
