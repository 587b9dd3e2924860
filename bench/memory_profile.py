"""Where a training step's memory goes, ours and transformers' LLaVA, step by step (issue 12 point 6: peak memory).

    python bench/memory_profile.py --packing                 # bench/train.py --packing's run: 2 warmup + 6 timed steps
    python bench/memory_profile.py --packing --top 8         # and the largest tensors kept for backward at each peak
    MALLOC_MMAP_THRESHOLD_=262144 python bench/memory_profile.py --packing   # RSS ~ live tensors (see below)

bench/train.py's worker on CPU in float32 (same folder, weights, length mix, batches, packing, AdamW on every parameter),
one fresh process per side. For each step it prints the batch's shape, its supervised rows, and the process's
resident memory growth over the loaded model (what bench/train.py's peak is taken from) at the phase edges:
start, peak in forward, after forward, peak in backward, after backward, peak in the optimizer step and after
`zero_grad(set_to_none=True)`; and the bytes the autograd graph keeps for backward (saved tensors, parameters
excluded, each storage once). The step with the highest peak is the one bench/train.py reports.

RSS is not the tensors alone: glibc keeps freed heap memory (below its mmap threshold, which rises up to 32 MiB
as large blocks are freed) for reuse, so the growth after a step stays above what is live. With
`MALLOC_MMAP_THRESHOLD_` set (fixing the threshold) every large tensor is its own mapping returned when freed,
and the figures follow the live tensors; this is a measuring aid, applied to both sides alike.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SIZES, PeakRss, emit, length_mix, load_models, packed, padded_batch, parse_result, rss_mib  # noqa: E402
from common import save_reference_folder  # noqa: E402

SIDES = ("ours", "reference")
PHASES = ("start", "fwd peak", "after fwd", "bwd peak", "after bwd", "opt peak", "end")


def worker(args: argparse.Namespace) -> None:
    import torch


    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = SIZES[args.size]
    model = load_models(args.folder, args.worker, args.attn).train()
    image_token_id, num_image_tokens = s["vocab"] - 1, (s["image_size"] // s["patch"]) ** 2
    data = length_mix(args.batch * (args.warmup + args.steps), vocab=s["vocab"], image_token_id=image_token_id,
                      num_image_tokens=num_image_tokens)
    batches = [padded_batch(data[i:i + args.batch], s["image_size"]) for i in range(0, len(data), args.batch)]
    if args.worker == "ours" and args.packing:
        batches = [packed(b, args.pack_length, image_token_id, num_image_tokens) for b in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    base = rss_mib()
    steps = []
    for batch in batches:
        saved: dict[int, tuple[int, str]] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = (storage.nbytes(), f"{tuple(t.shape)} {str(t.dtype)[6:]}")
            return t

        edges = [rss_mib() - base]
        with PeakRss() as peak, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(**batch).loss
        edges += [peak.peak - base, rss_mib() - base]
        with PeakRss() as peak:
            loss.backward()
        edges += [peak.peak - base, rss_mib() - base]
        with PeakRss() as peak:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        edges += [peak.peak - base, rss_mib() - base]
        by_shape = collections.Counter()
        for nbytes, shape in saved.values():
            by_shape[shape] += nbytes / 2**20
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        steps.append({"shape": list(batch["input_ids"].shape), "supervised": supervised, "edges": edges,
                      "saved_mib": sum(n for n, _ in saved.values()) / 2**20, "top": by_shape.most_common(args.top)})
        del loss
    emit({"steps": steps})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="42m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps after the warmup (bench/train.py's timed steps)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--packing", action="store_true", help="ours on packed rows (vlm's --packing)")
    parser.add_argument("--pack-length", type=int, default=2048)
    parser.add_argument("--top", type=int, default=0, help="the largest saved-tensor shapes of each side's peak step")
    parser.add_argument("--side", choices=SIDES, nargs="+", default=list(SIDES))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    flags = [f"--{k}={v}" for k, v in (("size", args.size), ("batch", args.batch), ("steps", args.steps),
                                       ("warmup", args.warmup), ("attn", args.attn), ("threads", args.threads),
                                       ("pack-length", args.pack_length), ("top", args.top))]
    flags += ["--packing"] * args.packing
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_reference_folder(tmp, args.size)
        for side in args.side:
            done = subprocess.run([sys.executable, __file__, "--worker", side, "--folder", tmp, *flags],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
            steps = parse_result(done.stdout)["steps"]
            print(f"\n{side}: RSS growth over the loaded model, MiB (steps 1-{args.warmup} are bench/train.py's warmup)")
            print("| step | batch | supervised | " + " | ".join(PHASES) + " | saved for backward |")
            print("| --- " * (len(PHASES) + 4) + "|")
            for i, step in enumerate(steps, 1):
                edges = " | ".join(f"{x:.0f}" for x in step["edges"])
                print(f"| {i} | {'x'.join(map(str, step['shape']))} | {step['supervised']} | {edges} | "
                      f"{step['saved_mib']:.0f} |")
            timed = steps[args.warmup:]
            top = max(timed, key=lambda step: max(step["edges"]))
            peaks[side] = max(top["edges"])
            print(f"peak over the timed steps: {peaks[side]:.0f} MiB at step {steps.index(top) + 1} "
                  f"({'x'.join(map(str, top['shape']))}); peak over the first 3 timed steps: "
                  f"{max(max(step['edges']) for step in timed[:3]):.0f} MiB")
            for shape, mib in top["top"]:
                print(f"    saved {shape}: {mib:.1f} MiB")
    if len(peaks) == 2:
        print(f"\npeak ours / reference: {peaks['ours'] / peaks['reference']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
