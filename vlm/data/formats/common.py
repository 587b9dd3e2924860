"""Small helpers every reader uses to build canonical samples and report records it cannot read.

A reader turns one raw record into either a canonical sample
`{"id": str, "images": [str], "messages": [{"role", "content"}], "meta"?: {...}}` or a
`SampleError` carrying the record's position, so the caller can report it; nothing is skipped here.
`meta` (optional) keeps the record's other scalar top-level fields (e.g. `source`) and lists of scalars, so
`vlm data filter --field` can select on them and `vlm data convert` writes them back.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterable

from vlm.data.embedded import EmbeddedImage
from vlm.data.errors import SampleError
from vlm.errors import ConfigError

IMAGE = "<image>"
CAPTION_MODES = ("each", "sample")


def record_id(value: Any, path: Path, index: int) -> str:
    """The source's own id when it has one (str or int), else `<file stem>:<index>`."""
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int)) or value == "":
        return f"{path.stem}:{index}"
    return str(value)


def bad(detail: str, path: Path, index: int, sample_id: str | None = None, reason: str = "bad_schema") -> SampleError:
    """A SampleError for raw record `index` of `path`."""
    return SampleError(reason, f"{path.name} record {index}: {detail}", index=index, sample_id=sample_id)


def image_list(value: Any) -> list[str | EmbeddedImage]:
    """`image` as LLaVA writes it (absent, a string, or a list of strings) -> list; TypeError otherwise.

    A table's image cell (an `EmbeddedImage` reference, or a list of them) counts as a file name; a dict
    written in a JSON file does not (it could point anywhere)."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, EmbeddedImage)):
        return [value]
    if isinstance(value, list) and all((isinstance(v, str) and v) or isinstance(v, EmbeddedImage) for v in value):
        return list(value)
    raise TypeError(f"'image' must be a file name or a list of file names, got {value!r:.80}")


def extra_fields(record: dict, used: Iterable[str]) -> dict[str, Any]:
    """The record's scalar top-level fields other than `used` (kept as the sample's `meta`), and its lists of
    scalars or of flat objects of scalars (VQA's ten answers as strings or as `{"answer", "answer_id", ...}`,
    several reference captions: what `vlm eval --references_field` reads)."""
    skip = set(used)
    return {k: v for k, v in record.items() if k not in skip and (isinstance(v, _SCALARS) or (
        isinstance(v, list) and all(_scalar_or_flat(x) for x in v)))}


_SCALARS = (str, int, float, bool)


def _scalar_or_flat(value: Any) -> bool:
    return isinstance(value, _SCALARS) or (isinstance(value, dict) and not isinstance(value, EmbeddedImage) and all(
        isinstance(x, _SCALARS) or x is None for x in value.values()))


def make_sample(sample_id: str, images: list[str], messages: list[dict], meta: dict | None = None) -> dict:
    sample = {"id": sample_id, "images": images, "messages": messages}
    if meta:
        sample["meta"] = meta
    return sample


def prompt_text(prompt: str) -> str:
    """User text of a caption sample: `<image>` then the prompt, if any."""
    return f"{IMAGE}\n{prompt}" if prompt else IMAGE


def caption_samples(
    base_id: str,
    image: str,
    captions: list[str],
    *,
    user: str,
    caption_mode: str,
    seed: int,
    system: str | None = None,
) -> list[dict]:
    """Image-caption pairs: [system], user `user` -> assistant caption.

    `caption_mode="each"` gives one sample per caption (ids `<base_id>:<k>`, or `base_id` for a single
    caption); `"sample"` picks one caption per image with an RNG seeded by (`seed`, `base_id`), so the
    choice does not depend on file order.
    """
    if len(captions) == 1:
        pairs = [(base_id, captions[0])]
    elif caption_mode == "sample":
        chosen = random.Random(f"{seed}:{base_id}").randrange(len(captions))
        pairs = [(base_id, captions[chosen])]
    else:
        pairs = [(f"{base_id}:{k}", c) for k, c in enumerate(captions)]
    head = [{"role": "system", "content": system}] if system else []
    return [
        make_sample(sid, [image], head + [{"role": "user", "content": user}, {"role": "assistant", "content": c.strip()}])
        for sid, c in pairs
    ]


def caption_list(value: Any) -> list[str]:
    """A caption or a list of captions -> non-empty list of strings; TypeError otherwise."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return value
    raise TypeError(f"caption must be a string or a non-empty list of strings, got {value!r:.80}")


def check_caption_mode(caption_mode: str) -> None:
    if caption_mode not in CAPTION_MODES:
        raise ConfigError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
