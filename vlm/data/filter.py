"""`vlm data filter`: keep or drop samples by source subset, and check the image layout of what is kept.

    # reduce a remote-sensing instruction set (subsets NWPU, RSICD, UAV, UCM, LR, DOTA) to four
    vlm data filter --data_path rs_instruct.json --image_folder rs_images \\
        --keep-prefix NWPU,RSICD,LR,DOTA --output rs_4.json --report rs_4_report.json

Design choices:
- A sample's subset is found from its *first* image path (leading `./` ignored): the first listed
  prefix the path starts with (plain string prefix: `LR` also matches `LR_xx/...`; write `LR/` to
  mean the folder only). With `--field F` the subset is the record's field F instead (kept through
  the sample's `meta`, e.g. a `source` column). A sample without images or without the field is in
  no listed subset: `--keep-*` drops it, `--drop-*` keeps it. Prefix and field filters combine (both
  must keep a sample). In the report, a path matching no prefix is named by its top-level folder.
- For kept samples every image is looked up under `--image_folder` (no decoding: that is
  `vlm data check --check_images full`); missing or unsafe ones are counted per subset, and each
  subset's top-level folders are checked for existence, so a wrong layout (`NWPU/` missing, images
  flat instead of in subset folders) shows at once. The first missing paths per subset go to the
  report.
- Output is LLaVA JSON (`convert.write_llava`), the records the reader could not read are counted,
  not written.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlm.data.convert import ProblemLog, write_llava
from vlm.data.errors import DataError, SampleError
from vlm.data.mix import Source, iter_source
from vlm.data.paths import ImageFolder
from vlm.errors import ConfigError

_KEEP_MISSING = 100  # missing paths listed per subset in the report
NO_SUBSET = "(none)"


@dataclass(frozen=True)
class SubsetRule:
    """Which subsets to keep (`keep=True`) or drop (`keep=False`); subsets come from prefixes or a field."""

    values: tuple[str, ...]
    keep: bool
    field: str | None = None  # None: image-path prefixes

    def classify(self, sample: dict) -> tuple[str | None, bool]:
        """(subset name for the report, whether the sample is in one of `values`).

        An image path matching no prefix is named by its top-level folder (so dropped subsets show
        up by name in the report), or None when it has none.
        """
        if self.field is not None:
            value = (sample.get("meta") or {}).get(self.field)
            name = None if value is None else str(value)
            return name, name in self.values
        if not sample["images"]:
            return None, False
        if isinstance(sample["images"][0], dict):  # embedded in a table: the output, LLaVA JSON, holds paths
            raise DataError(f"sample {sample['id']!r} has images embedded in a table; vlm data filter writes LLaVA "
                            "JSON, which holds file paths (filter the table itself, e.g. with the datasets library)")
        path = sample["images"][0].removeprefix("./")
        matched = next((prefix for prefix in self.values if path.startswith(prefix)), None)
        if matched is not None:
            return matched, True
        return (path.split("/", 1)[0] if "/" in path else None), False

    def admits(self, sample: dict) -> tuple[str | None, bool]:
        """(subset name, whether this rule keeps the sample)."""
        name, listed = self.classify(sample)
        return name, listed == self.keep


def make_rule(keep: Sequence[str] | None, drop: Sequence[str] | None, field: str | None = None) -> SubsetRule | None:
    """A rule from `--keep-*` / `--drop-*` values (at most one of them); None when both are empty."""
    what = f"--field {field} values" if field else "prefixes"
    if keep and drop:
        raise ConfigError(f"give either keep or drop {what}, not both")
    if not keep and not drop:
        if field:
            raise ConfigError(f"--field {field} needs --keep-values or --drop-values")
        return None
    return SubsetRule(tuple(keep or drop), keep=bool(keep), field=field)


def filter_samples(
    samples: Iterator[dict | SampleError], rules: Sequence[SubsetRule], log: ProblemLog
) -> Iterator[tuple[dict, str | None, bool]]:
    """(sample, subset, kept) for every readable sample; unreadable ones go to `log`.

    The subset named is that of the first rule (prefixes before field when both are given).
    """
    for sample in log.passing(samples):
        verdicts = [rule.admits(sample) for rule in rules]
        yield sample, (verdicts[0][0] if verdicts else None), all(kept for _, kept in verdicts)


class LayoutCheck:
    """Per subset: sample counts and, for kept samples, missing images and top-level folders."""

    def __init__(self, image_folder: str | None):
        self.folder = None if image_folder is None else ImageFolder(image_folder)
        self.stats: dict[str, dict[str, Any]] = {}
        self.missing: dict[str, list[str]] = defaultdict(list)
        self._folders: dict[str, set[str]] = defaultdict(set)

    def add(self, sample: dict, subset: str | None, kept: bool) -> None:
        name = subset if subset is not None else NO_SUBSET
        stats = self.stats.setdefault(name, {"kept": kept, "samples": 0, "images": 0, "missing_images": 0})
        stats["samples"] += 1
        if not kept or self.folder is None:
            return
        for image in sample["images"]:
            stats["images"] += 1
            top = image.removeprefix("./").split("/", 1)
            if len(top) == 2:
                self._folders[name].add(top[0])
            try:
                self.folder.resolve(image)
            except SampleError as e:
                stats["missing_images"] += 1
                if len(self.missing[name]) < _KEEP_MISSING:
                    self.missing[name].append(f"{image} ({e.reason})")

    def report(self) -> dict[str, Any]:
        for name, stats in self.stats.items():
            if name in self._folders:
                root = self.folder.root
                stats["folders"] = {d: os.path.isdir(os.path.join(root, d)) for d in sorted(self._folders[name])}
        return {"subsets": self.stats, "missing": dict(self.missing)}


def filter_file(
    data_path: str | Path,
    output: str | Path,
    *,
    image_folder: str | None = None,
    keep_prefix: Sequence[str] | None = None,
    drop_prefix: Sequence[str] | None = None,
    field: str | None = None,
    keep_values: Sequence[str] | None = None,
    drop_values: Sequence[str] | None = None,
    format: str = "auto",
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """Filter `data_path` into LLaVA JSON at `output`; return the report.

    Returns:
        `{"format", "input", "kept", "subsets": {name: {"kept", "samples", "images", "missing_images",
        "folders"?}}, "missing": {name: [paths]}, "skipped": {reason: n}, "problems": [...]}`.
    """
    rules = [r for r in (make_rule(keep_prefix, drop_prefix), make_rule(keep_values, drop_values, field)) if r]
    if not rules:
        raise ConfigError("nothing to filter by: give --keep-prefix/--drop-prefix and/or --field with --keep-values/--drop-values")
    fmt, items = iter_source(Source(path=str(data_path), format=format, options=options), seed=seed)
    log = ProblemLog()
    layout = LayoutCheck(image_folder)
    counts = {"input": 0}

    def kept_samples() -> Iterator[dict]:
        for sample, subset, kept in filter_samples(items, rules, log):
            counts["input"] += 1
            layout.add(sample, subset, kept)
            if kept:
                yield sample

    written = write_llava(kept_samples(), output)
    return {"format": fmt, "input": counts["input"], "kept": written, **layout.report(), **log.summary()}


def format_report(report: dict[str, Any]) -> str:
    """The per-subset table `vlm data filter` prints."""
    lines = [f"{'subset':<16} {'kept':<5} {'samples':>8} {'images':>8} {'missing':>8}  folders"]
    for name, s in sorted(report["subsets"].items()):
        folders = " ".join(f"{d}/{'' if ok else ' (MISSING)'}" for d, ok in s.get("folders", {}).items())
        images, missing = (s["images"], s["missing_images"]) if s["kept"] else ("-", "-")
        lines.append(f"{name:<16} {'yes' if s['kept'] else 'no':<5} {s['samples']:>8} {images:>8} {missing:>8}  {folders}")
    lines.append(f"kept {report['kept']} of {report['input']} readable samples ({report['format']})")
    for reason, count in report["skipped"].items():
        lines.append(f"unreadable records: {reason}={count}")
    for name, paths in report["missing"].items():
        lines.append(f"missing in {name}: " + ", ".join(paths[:5]) + (" ..." if len(paths) > 5 else ""))
    return "\n".join(lines)
