"""Benchmark: torch thread count for the demo's training and for the test suite, with the machine's load.

    python bench/bench_threads.py demo                      # 150-step demo runs, threads 1 and 2, alternated
    python bench/bench_threads.py demo --steps 300 --repeats 3
    python bench/bench_threads.py tests tests/test_model.py tests/test_train.py   # pytest wall time, 1 vs 2

`demo`: each run is `python -m vlm demo` in a fresh folder (2,000 images, `--max_steps STEPS`,
`--threads N`); the figure is the trainer's own steps/s over the training loop (`train_steps_per_s` in
eval.json: data generation, data check and evaluation excluded).
`tests`: `python -m pytest FILES -q -p no:cacheprovider` with `OMP_NUM_THREADS=N`, which sets torch's
thread count at start-up and is what tests/conftest.py's setting replaces (`VLM_TEST_THREADS=N` tells
conftest to use N instead of its default, so the figures compare thread counts, not the fixture).
Each figure is printed with the 1-minute load average before and after it (`os.getloadavg`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def bench_demo(threads: list[int], steps: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for n in threads:
                run_dir = os.path.join(tmp, f"t{n}-{repeat}")
                before = load()
                subprocess.run([sys.executable, "-m", "vlm", "demo", "--output_dir", run_dir, "--n_train", "2000",
                                "--n_eval", "20", "--max_steps", str(steps), "--save_steps", str(steps),
                                "--threads", str(n)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                with open(os.path.join(run_dir, "eval.json"), encoding="utf-8") as f:
                    result = json.load(f)
                print(f"demo threads={n} steps={steps} steps/s={result['train_steps_per_s']} "
                      f"load(1/5/15 min) before={before} after={load()}", flush=True)


def bench_tests(threads: list[int], files: list[str], repeats: int) -> None:
    for _ in range(repeats):
        for n in threads:
            env = {**os.environ, "OMP_NUM_THREADS": str(n), "VLM_TEST_THREADS": str(n)}
            before = load()
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wall = time.perf_counter() - start
            summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            print(f"tests threads={n} wall={wall:.1f}s ({summary}) load(1/5/15 min) before={before} after={load()}",
                  flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("demo", "tests"))
    parser.add_argument("files", nargs="*", help="test files (tests)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--steps", type=int, default=150, help="training steps per demo run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all thread counts, alternated")
    args = parser.parse_args()
    threads = [int(x) for x in args.threads.split(",")]
    if args.what == "demo":
        bench_demo(threads, args.steps, args.repeats)
    else:
        bench_tests(threads, args.files or ["tests"], args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
