"""Files shipped inside the package, found the same way from a source checkout and from an installed wheel.

    vlm/assets/examples/shapes.png, shapes.json   the example picture `test.py` / `vlm ask` answer about
                                                   by default, and its question and answer
    vlm/assets/deepspeed/zero2.json, zero3.json   DeepSpeed ZeRO-2/3 configs (LLaVA's `scripts/zero*.json`)

They are package data (pyproject.toml) located through `importlib.resources`, never relative to the
repository, so `vlm ask` and `--deepspeed zero3` work outside it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DEEPSPEED_CONFIGS = ("zero2", "zero3")


def asset_path(name: str) -> Path:
    """The path of a shipped file, e.g. `asset_path("deepspeed/zero3.json")`; FileNotFoundError names the
    files there are."""
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"vlm ships no file {name!r}; it ships: {', '.join(list_assets())}")
    return path


def list_assets() -> list[str]:
    """Every shipped file, as a name `asset_path` takes."""
    root = Path(str(resources.files(__name__)))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc"))


def example() -> tuple[Path, str]:
    """The bundled example: (image path, question)."""
    import json

    record = json.loads(asset_path("examples/shapes.json").read_text(encoding="utf-8"))
    return asset_path(f"examples/{record['image']}"), record["question"]


def resolve_deepspeed_config(value: str) -> str:
    """`--deepspeed` value -> a config file: an existing file as given; otherwise a shipped config named by
    `zero2`/`zero3`, `zero3.json` or LLaVA's `./scripts/zero3.json`; anything else unchanged (transformers
    then reports the missing file)."""
    if os.path.isfile(value):
        return value
    stem = Path(value).name.removesuffix(".json")
    if stem in DEEPSPEED_CONFIGS:
        return str(asset_path(f"deepspeed/{stem}.json"))
    return value
