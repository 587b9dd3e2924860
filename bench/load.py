"""Benchmark: the memory a model-folder load takes, against the model's own size and against transformers.

    python bench/load.py                          # 42M model, 3 interleaved rounds, appends to RESULTS.md
    python bench/load.py --size small --repeats 1 --no-record                    # a smoke test

One llava-hf folder (bench/common.py's reference model) and the vlm folder of the same weights. Each load runs in
a fresh Python process that imports everything first, then loads under the `PeakRss` sampler; the figure is the
peak resident-memory growth during the load, divided by the bytes of the loaded model's parameters and buffers
(1.0x: the weights once; a loader holding the whole file beside the model shows ~2x). Every weight is read once
inside the measured block (as a first forward would): a memory-mapped weight only becomes resident when read, so
without that a loader that maps the file would look free. Loaders, run in turn:
- transformers: `LlavaForConditionalGeneration.from_pretrained` on the llava-hf folder (the reference);
- ours, llava-hf: `vlm.load_pretrained_model`'s path for that folder (`vlm.folders.llava_hf.load_llava_hf`);
- ours, vlm folder: `vlm.folders.build.from_pretrained` on the vlm folder.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PeakRss, SIZES, append_result, emit, load_average, parse_result, rss_mib, save_reference_folder, summarise  # noqa: E402,E501

SIDES = ("transformers", "ours-llava-hf", "ours-vlm")


def model_bytes(model) -> int:
    """Bytes of the model's distinct parameters and buffers (tied weights once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def worker(side: str, folder: str) -> None:
    import gc

    import torch  # noqa: F401  everything imported before measuring: only the load itself counts
    import transformers.models.llava.modeling_llava  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    import transformers.models.siglip.modeling_siglip  # noqa: F401
    from transformers import LlavaForConditionalGeneration

    from vlm.folders.build import from_pretrained
    from vlm.folders.llava_hf import load_llava_hf

    loaders = {"transformers": lambda: LlavaForConditionalGeneration.from_pretrained(os.path.join(folder, "hf")),
               "ours-llava-hf": lambda: load_llava_hf(os.path.join(folder, "hf")),
               "ours-vlm": lambda: from_pretrained(os.path.join(folder, "vlm"))}
    gc.collect()
    before = rss_mib()
    with PeakRss() as peak:
        model = loaders[side]()
        loaded = rss_mib()
        # A memory-mapped weight is resident only once read: read every one (as the first forward does), so a
        # loader that maps the file and one that copies it are measured alike.
        for tensor in [*model.parameters(), *model.buffers()]:
            float(tensor.float().sum())
    emit({"peak_growth_mib": peak.peak - before, "loaded_mib": loaded - before, "model_mib": model_bytes(model) / 2**20})


def save_vlm_folder(folder: str) -> None:
    """The vlm folder of the llava-hf reference's weights (loaded by our llava-hf path, saved as vlm saves)."""
    from vlm.folders.llava_hf import load_llava_hf
    from vlm.folders.weights import save_model

    save_model(load_llava_hf(os.path.join(folder, "hf")), os.path.join(folder, "vlm"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="42m")
    parser.add_argument("--repeats", type=int, default=3, help="loads per side, interleaved")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--note", default="", help="a line added under the recorded table (e.g. which code ran)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folder)
        return 0

    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        save_reference_folder(os.path.join(tmp, "hf"), args.size)
        save_vlm_folder(tmp)
        for repeat in range(args.repeats):
            for side in SIDES:
                done = subprocess.run([sys.executable, __file__, "--worker", side, "--folder", tmp],
                                      capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if done.returncode:
                    sys.exit(f"{side} load failed:\n{done.stderr[-3000:]}")
                result = parse_result(done.stdout)
                results[side].append(result)
                print(f"run {repeat + 1} {side:<14} model {result['model_mib']:6.1f} MiB  peak +"
                      f"{result['peak_growth_mib']:6.1f} MiB  right after the load +{result['loaded_mib']:6.1f} MiB  "
                      f"load {load_average()}", flush=True)
    ref_peak = summarise([r["peak_growth_mib"] for r in results["transformers"]])[1]
    table = ["| loader | model MiB | peak growth MiB min | median | peak / model size (median) | peak / transformers' |",
             "| --- | --- | --- | --- | --- | --- |"]
    for side in SIDES:
        low, median = summarise([r["peak_growth_mib"] for r in results[side]])
        size = results[side][0]["model_mib"]
        table.append(f"| {side} | {size:.1f} | {low:.1f} | {median:.1f} | {median / size:.2f}x | "
                     f"{median / ref_peak:.2f}x |")
    notes = ["Peak resident-memory growth of a fresh process during the load (bench/common.py PeakRss, sampled "
             "every 2 ms), everything imported first, every weight read once inside the measured block (a memory-mapped "
             "weight is resident only once read); the model's size is its distinct parameters and buffers."]
    notes += [args.note] if args.note else []
    print("\n".join(table + notes))
    if not args.no_record:
        append_result(f"Model-folder load memory, ours vs transformers LLaVA, {args.size} (issue 12, point 7)",
                      "python bench/load.py " + shlex.join(sys.argv[1:]), table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
