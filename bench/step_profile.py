"""Where one training step's time goes, on a GPU: forward, backward and optimizer step timed with CUDA events,
model FLOPs and MFU per configuration, and the top CUDA kernels of one step (torch.profiler).

    python bench/step_profile.py --size 0.5b --batch 16 --pack-length 4096     # on a CUDA machine
    python bench/step_profile.py --size 0.5b --batch 64 --pack-length 16384 --no-kernels

Ours only (the comparison with transformers' LLaVA is bench/train.py); the same length mix and packing as
bench/train.py. This is the tool used to find why MFU is what it is; it records nothing by itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (SIZES, length_mix, load_models, packed, padded_batch, save_reference_folder,  # noqa: E402
                    training_flops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="samples per step (several: one run each)")
    parser.add_argument("--pack-length", type=int, default=4096, help="tokens per packed row; 0: padded batches")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--peak-tflops", type=float, default=989.4)
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) (bench/train.py uses the default)")
    parser.add_argument("--chunk-logits", type=int, nargs="+", default=[0],
                        help="experiment: vlm.llm.loss.FUSED_CHUNK_LOGITS for the run (0: the library's); several: one "
                             "run each")
    parser.add_argument("--min-rows", type=int, nargs="+", default=[0],
                        help="experiment: vlm.llm.loss.LOW_PRECISION_MIN_ROWS for the run (0: the library's); several: "
                             "one run each")
    parser.add_argument("--compile", action="store_true",
                        help="experiment: torch.compile each decoder layer (dynamic shapes: packed widths change)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the torch.profiler kernel table")
    args = parser.parse_args()

    import torch


    s = SIZES[args.size]
    image_token_id, num_image_tokens = s["vocab"] - 1, (s["image_size"] // s["patch"]) ** 2
    with tempfile.TemporaryDirectory() as tmp:
        save_reference_folder(tmp, args.size)
        model = load_models(tmp, "ours", args.attn).to("cuda", torch.bfloat16).train()
    if args.compile:
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.fused_adamw or None)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.attn}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    print("| samples/step | rows x width | tokens | fwd ms | bwd ms | optim ms | step ms | tokens/s | TFLOP/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    import itertools
    import time

    import vlm.llm.loss

    default_chunk, default_min_rows = vlm.llm.loss.FUSED_CHUNK_LOGITS, vlm.llm.loss.LOW_PRECISION_MIN_ROWS
    for batch_size, chunk_logits, min_rows in itertools.product(args.batch, args.chunk_logits, args.min_rows):
        vlm.llm.loss.FUSED_CHUNK_LOGITS = chunk_logits or default_chunk
        vlm.llm.loss.LOW_PRECISION_MIN_ROWS = min_rows or default_min_rows
        data = length_mix(batch_size * (args.steps + 2), vocab=s["vocab"], image_token_id=image_token_id,
                          num_image_tokens=num_image_tokens)
        batches = [padded_batch(data[i:i + batch_size], s["image_size"]) for i in range(0, len(data), batch_size)]
        if args.pack_length:
            batches = [packed(b, args.pack_length, image_token_id, num_image_tokens) for b in batches]
        batches = [{k: (v.to("cuda", torch.bfloat16) if k == "pixel_values" else v.to("cuda")) for k, v in b.items()}
                   for b in batches]
        times = []
        for step, batch in enumerate(batches):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            events[0].record()
            loss = model(**batch).loss
            events[1].record()
            loss.backward()
            events[2].record()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            events[3].record()
            torch.cuda.synchronize()
            if step >= 2:
                times.append([events[i].elapsed_time(events[i + 1]) for i in range(3)])
        fwd, bwd, opt = (statistics.median(t[i] for t in times) for i in range(3))
        step_ms = fwd + bwd + opt
        per_step = [data[i:i + batch_size] for i in range(2 * batch_size, len(data), batch_size)]
        tokens = statistics.median(sum(len(e.input_ids) for e in chunk) for chunk in per_step)
        flops = statistics.median(training_flops(args.size, chunk) for chunk in per_step)
        shape = "x".join(str(d) for d in batches[-1]["input_ids"].shape)
        tflops = flops / step_ms / 1e9
        print(f"| {batch_size} | {shape} | {tokens:.0f} | {fwd:.1f} | {bwd:.1f} | {opt:.1f} | {step_ms:.1f} | "
              f"{tokens / step_ms * 1e3:.0f} | {tflops:.1f} | {tflops / args.peak_tflops:.1%} |", flush=True)
        rows = vlm.llm.loss._fused_rows(model.lm_head.weight, "cuda")
        print(f"  loss chunk: FUSED_CHUNK_LOGITS {vlm.llm.loss.FUSED_CHUNK_LOGITS}, {rows} rows in bf16; "
              f"peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats()
        if not args.no_kernels:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                for batch in batches[-2:]:
                    model(**batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
            averages = prof.key_averages()
            busy = sum(e.self_device_time_total for e in averages) / 1e3
            print(f"  profiled 2 steps: wall {wall * 1e3:.0f} ms, GPU kernels {busy:.0f} ms "
                  f"(busy {busy / wall / 1e3:.0%}; the rest is the GPU waiting for the CPU)")
            print(averages.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
            print("  GPU kernel time by kind over the 2 steps:", kernel_kinds(averages))
    return 0


def kernel_kinds(averages) -> str:
    """Kernel time (ms) by kind, from the profiler's kernel-level entries (operator entries would count twice)."""
    import re

    kinds = {"matmul": r"nvjet|gemm|cutlass|xmma|cublas", "attention": r"flash|fmha|attention|sdpa",
             "softmax/loss": r"softmax|nll|cross_entropy|log_softmax", "elementwise/copy": r"elementwise|copy|cat|index",
             "reduce/norm": r"reduce|norm"}
    totals = dict.fromkeys([*kinds, "other"], 0.0)
    for e in averages:
        name = e.key
        if name.startswith(("aten::", "autograd::", "Optimizer.", "cuda", "Memcpy", "Memset")) or e.self_device_time_total <= 0:
            continue
        kind = next((k for k, pattern in kinds.items() if re.search(pattern, name, re.I)), "other")
        totals[kind] += e.self_device_time_total / 1e3
    return ", ".join(f"{k} {v:.0f}" for k, v in totals.items())


if __name__ == "__main__":
    sys.exit(main())
