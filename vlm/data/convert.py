"""`vlm data convert`: any supported input written as LLaVA JSON.

    convert_file("captions.json", "llava.json", format="ai_challenger", caption_mode="sample")

Design choices:
- Output is a JSON array with one compact record per line (`[\\n{...},\\n{...}\\n]`), UTF-8 without
  escaping (Chinese captions stay readable), written to a temporary file and renamed, so a failed run
  never leaves half a file. Records are streamed: memory does not grow with the input.
- Records the reader cannot read (`bad_schema`, `bad_roles`) are not written; they are counted by
  reason and returned (and printed by the CLI), never dropped silently. Other checks (images, token
  lengths) are `vlm data check`'s job.
- LLaVA input round-trips: converting a LLaVA file gives the same records (extra scalar fields kept
  through the sample's `meta`), and converting the output again gives the same file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from vlm.data.errors import SampleError
from vlm.data.formats.llava import to_llava
from vlm.data.mix import Source, iter_source

_KEEP_PROBLEMS = 20


def write_llava(samples: Iterable[dict], output: str | Path) -> int:
    """Write canonical samples as a LLaVA JSON array (one record per line); return how many."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[")
            for sample in samples:
                f.write(",\n" if count else "\n")
                f.write(json.dumps(to_llava(sample), ensure_ascii=False, separators=(",", ":")))
                count += 1
            f.write("\n]\n")
    except BaseException:  # a record that cannot be written (an embedded image), Ctrl-C: no half file left
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    return count


class ProblemLog:
    """Counts SampleErrors by reason and keeps the first few for the summary."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: list[dict[str, Any]] = []

    def add(self, error: SampleError) -> None:
        self.counts[error.reason] += 1
        if len(self.first) < _KEEP_PROBLEMS:
            self.first.append({"index": error.index, "id": error.sample_id, "reason": error.reason, "detail": error.detail})

    def passing(self, items: Iterable[dict | SampleError]) -> Iterable[dict]:
        """`items` without the SampleErrors, which are logged."""
        for item in items:
            if isinstance(item, SampleError):
                self.add(item)
            else:
                yield item

    def summary(self) -> dict[str, Any]:
        return {"skipped": dict(self.counts), "problems": self.first}


def convert_file(
    input: str | Path, output: str | Path, *, format: str = "auto", seed: int = 0, **options: Any
) -> dict[str, Any]:
    """Convert `input` (any supported format) to LLaVA JSON at `output`.

    Args:
        input: data file.
        output: LLaVA JSON file to write.
        format: "auto" or a reader name.
        seed: for readers that sample (one caption per image).
        **options: reader options (`prompt`, `caption_mode`, `seed`, `image_map`, ...).

    Returns:
        `{"format", "written", "skipped": {reason: count}, "problems": [first few]}`.
    """
    fmt, items = iter_source(Source(path=str(input), format=format, options=options), seed=seed)
    log = ProblemLog()
    written = write_llava(log.passing(items), output)
    return {"format": fmt, "written": written, **log.summary()}
