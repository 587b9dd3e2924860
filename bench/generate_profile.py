"""Profile: where batched and one-by-one generation spend their time, and how far batching can take the ratio.

    python bench/generate_profile.py                      # 42m model, 8 prompts, batch 8, 32 new tokens, 3 rounds
    python bench/generate_profile.py --max_new_tokens 128 # a decode-heavy run
    python bench/generate_profile.py --ops --no-record    # and torch.profiler's operator table of one call each
    python bench/generate_profile.py --size small --repeats 1 --no-record                    # a smoke test

The workload is bench/generate.py's (same model, prompts and pixels: `--batch` prompts of one image + 20-60 text
ids, greedy, every answer `--max_new_tokens` long). Each round times the real calls of vlm's decode loop
(`vlm.generate.decoding.generate_ids`), one prompt per call and then all `--batch` prompts in one call (A B A B
...), with forward hooks (no change to what runs): the vision tower, the model's forward calls (the first is the
prefill, images included; each later one is a decode step) and the LM head inside them. What is left of a call's
time is transformers' `generate` around the forwards (input preparation, cache bookkeeping, logits processing,
stopping checks) and our own code around it.

The ceiling: one prompt costs V (vision) + P (prefill) + n x s1 (n steps of a batch-1 step) one by one and
V + P + n x sB / B in a batch of B. V and P are compute-bound (their cost per prompt does not fall with B; left
padding adds to it), so only the steps amortise, and the ratio cannot pass (V + P + n s1) / (V + P) even if a
batched step cost nothing; with a batch-B step as cheap as a batch-1 step (a step that only reads the weights once)
it is (V + P + n s1) / (V + P + n s1 / B).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SIZES, append_result, load_average  # noqa: E402
from generate import num_image_tokens, workload  # noqa: E402


class Timers:
    """Wall time of every call of the watched modules, by name, while `on`: forward hooks, no code changed."""

    def __init__(self, modules: dict) -> None:
        self.calls: dict[str, list[float]] = {name: [] for name in modules}
        self._start: dict[str, float] = {}
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda m, a, name=name: self._begin(name))
            module.register_forward_hook(lambda m, a, o, name=name: self._end(name))

    def _begin(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        self.calls[name].append(time.perf_counter() - self._start.pop(name))

    def reset(self) -> None:
        for calls in self.calls.values():
            calls.clear()


def split(timers: Timers, total: float, prompts: int) -> dict[str, float]:
    """One generate call's time, split: seconds per prompt for vision and prefill, per step for the rest."""
    forwards, vision, head = timers.calls["forward"], sum(timers.calls["vision"]), timers.calls["head"]
    steps = len(forwards) - 1
    step_time = sum(forwards[1:]) / steps
    return {"vision": vision / prompts, "prefill": (forwards[0] - vision) / prompts, "step": step_time,
            "step_head": sum(head[1:]) / steps, "step_body": step_time - sum(head[1:]) / steps,
            "overhead": (total - sum(forwards)) / steps, "total": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="42m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", action="store_true",
                        help="also print torch.profiler's operator table (by shape) of one call at each batch size")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    import torch

    from vlm.generate.decoding import GenerationSettings, generate_ids

    torch.set_num_threads(args.threads)
    model, _, prompts, pixels = workload(args.size, args.batch, reference=False)  # bench/generate.py's first --batch
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    timers = Timers({"forward": model, "vision": model.vision_tower, "head": model.lm_head})

    def timed(rows: range) -> dict[str, float]:
        timers.reset()
        start = time.perf_counter()
        generate_ids(model, [prompts[i] for i in rows], pixels[rows.start:rows.stop], stop_ids=[], pad_token_id=0,
                     settings=settings)
        return split(timers, time.perf_counter() - start, len(rows))

    def one_by_one() -> dict[str, float]:
        parts = [timed(range(i, i + 1)) for i in range(args.batch)]
        return {key: statistics.fmean(p[key] for p in parts) for key in parts[0]} | {
            "total": sum(p["total"] for p in parts)}

    sides = {"batch 1": one_by_one, f"batch {args.batch}": lambda: timed(range(args.batch))}
    for run in sides.values():
        run()  # warm-up
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, run in sides.items():
            rounds[name].append(run())
            print(f"run {repeat + 1} {name:<9} {rounds[name][-1]['total']:.2f} s  load {load_average()}", flush=True)
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        for rows in (range(1), range(args.batch)):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                timed(rows)
            print(f"operators of one call at batch {len(rows)} (prefill and {args.max_new_tokens - 1} steps)")
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in rounds.items()}
    one, many = med["batch 1"], med[f"batch {args.batch}"]
    n, b = args.max_new_tokens, args.batch
    steps = n - 1  # the prefill gives the first token

    def per_prompt(m: dict[str, float], rows: int) -> float:
        return m["vision"] + m["prefill"] + steps * (m["step"] + m["overhead"]) / rows

    fixed = one["vision"] + one["prefill"]
    one_cost = per_prompt(one, 1)
    table = ["| part | batch 1 | batch %d | batch %d / batch 1 |" % (b, b), "| --- | --- | --- | --- |"]
    parts = [("vision tower, ms per image", "vision"), ("prefill (LLM over the prompt), ms per prompt", "prefill"),
             ("decode step (one forward), ms", "step"), ("  of which the LM head, ms", "step_head"),
             ("  of which the decoder layers, ms", "step_body"),
             ("generate overhead per step (outside the forward), ms", "overhead")]
    table += [f"| {label} | {one[key] * 1e3:.1f} | {many[key] * 1e3:.1f} | {many[key] / one[key]:.2f}x |"
              for label, key in parts]
    cheap_steps = fixed + steps * (one["step"] + one["overhead"]) / b  # per prompt, a batch-b step priced as batch 1
    table += [f"| whole calls, s for the {b} prompts | {one['total']:.2f} | {many['total']:.2f} | "
              f"{one['total'] / many['total']:.2f}x faster batched |",
              f"| ms per prompt from the split | {one_cost * 1e3:.0f} | {per_prompt(many, b) * 1e3:.0f} | "
              f"{one_cost / per_prompt(many, b):.2f}x |",
              f"| ceiling: a batch-{b} step as cheap as a batch-1 step | | | {one_cost / cheap_steps:.2f}x |",
              f"| ceiling: batched steps free (vision + prefill only) | | | {one_cost / fixed:.2f}x |"]
    print("\n".join(table))
    if not args.no_record:
        append_result("Generation profile: batched vs one by one (issue 12)",
                      "python bench/generate_profile.py " + " ".join(sys.argv[1:]), table,
                      [f"{b} prompts of {num_image_tokens(args.size)} image + 23-63 text tokens (bench/generate.py's "
                       f"first {b}), {n} new tokens each ({steps} decode steps after the prefill), greedy, "
                       f"{args.threads} thread(s), float32, medians of {args.repeats} interleaved rounds."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
