"""Benchmark: tables with embedded images (vlm.data.formats.table, vlm.data.embedded): indexing memory and time
against image size, and the cost of reading one image, in order and at random, from a Parquet file (through its
Arrow copy, made on the first index) and from a save_to_disk folder (Arrow).

    python bench/bench_tables.py                       # 400 rows, 8x8 against 512x512 noise PNGs (~0.8 MB each)
    python bench/bench_tables.py --rows 2000 --size 768

Writes each table with the real `datasets` library (embedded bytes, as the hub's files hold them):
`Dataset.to_parquet` (row groups of 100 rows for image data, datasets' own setting) and `save_to_disk` (Arrow
IPC stream). Each measurement runs in a child process: the figures are the peak RSS while indexing (sampled
every 2 ms) and the RSS after it, minus the RSS after the imports; the index runs twice (the second reuses
the Parquet file's Arrow copy). Reading: `read_bytes` (the table cell's bytes) and a full
decode (`ImageFolder.open`), per image, for 100 rows in order and 100 at random.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, random, sys, time
from vlm.data.mix import MixedRecords, Source
from vlm.data.embedded import read_bytes
from vlm.data.paths import ImageFolder
import pyarrow, pyarrow.parquet, pyarrow.ipc, pyarrow.compute  # imported before the baseline
def now_rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
import threading
base_now = now_rss()
top = [base_now]
stop = threading.Event()
def watch():  # ru_maxrss keeps the imports' high-water mark: sample the current RSS instead
    while not stop.wait(0.002):
        top[0] = max(top[0], now_rss())
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
path = sys.argv[1]
t = time.perf_counter()
records = MixedRecords([Source(path)])
index_s = time.perf_counter() - t
stop.set(); watcher.join()
peak, held = max(top[0], now_rss()) - base_now, now_rss() - base_now
t = time.perf_counter()
records = MixedRecords([Source(path)])
again_s = time.perf_counter() - t
stored = sum(records.stored_size(k) for k in range(len(records)))
folder = ImageFolder(None)
rng = random.Random(0)
out = {"rows": len(records), "index_s": index_s, "again_s": again_s, "index_peak_mib": peak, "held_mib": held,
       "stored_bytes": stored}
for order, rows in (("in_order", list(range(min(100, len(records))))),
                    ("random", rng.sample(range(len(records)), min(100, len(records))))):
    images = [records[k][0]["images"][0] for k in rows]
    t = time.perf_counter()
    for image in images:
        read_bytes(image)
    out[f"{order}_bytes_ms"] = (time.perf_counter() - t) * 1000 / len(images)
    t = time.perf_counter()
    for image in images:
        folder.open(image)
    out[f"{order}_decode_ms"] = (time.perf_counter() - t) * 1000 / len(images)
print(json.dumps(out))
"""


def write_tables(folder: Path, rows: int, size: int) -> dict[str, Path]:
    import numpy as np
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage
    import io

    rng = np.random.default_rng(0)
    png = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(png, format="PNG")
    data = png.getvalue()  # one noise image repeated: the bytes per row are what matters, not their variety
    table = Dataset.from_dict(
        {"image": [{"bytes": data, "path": f"{k}.png"} for k in range(rows)],
         "query": [f"question {k}?" for k in range(rows)], "label": [str(k) for k in range(rows)]},
        features=Features({"image": Image(), "query": Value("string"), "label": Value("string")}))
    parquet = folder / f"t{size}.parquet"
    table.to_parquet(str(parquet))
    table.save_to_disk(str(folder / f"t{size}_arrow"))
    return {"parquet": parquet, "arrow": folder / f"t{size}_arrow", "image_bytes": len(data)}


def measure(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--size", type=int, default=512, help="side of the large noise images")
    args = parser.parse_args()
    print(f"load before: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VLM_TABLE_CACHE"] = os.path.join(tmp, "cache")  # Parquet's Arrow copies (made on first index)
        for size in (8, args.size):
            tables = write_tables(Path(tmp), args.rows, size)
            file_mib = os.path.getsize(tables["parquet"]) / 2**20
            print(f"\n{args.rows} rows of {size}x{size} PNG ({tables['image_bytes'] / 1024:.1f} KiB each), parquet "
                  f"{file_mib:.1f} MiB")
            for kind in ("parquet", "arrow"):
                r = measure(tables[kind])
                print(f"  {kind:7s}: index {r['index_s']:.2f} s (again {r['again_s']:.2f} s), peak RSS +"
                      f"{r['index_peak_mib']:.1f} MiB, RSS after +{r['held_mib']:.1f} MiB, stored "
                      f"{r['stored_bytes'] / r['rows']:.0f} B/row; per image: bytes in order {r['in_order_bytes_ms']:.2f} "
                      f"ms, random {r['random_bytes_ms']:.2f} ms; decode in order {r['in_order_decode_ms']:.2f} ms, "
                      f"random {r['random_decode_ms']:.2f} ms")
    print(f"\nload after: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
