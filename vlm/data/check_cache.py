"""The validation result of a training run, kept on disk so that a resume (and every other rank) need not check
every sample again (`vlm.train.dataset.build_train_dataset` uses it).

    key = validation_key(records.sources, tokenizer, settings)
    path = cache_path(output_dir, key)
    cached, why_not = read_validation(path, key, total=len(records))  # (kept, report), or None: check,
    write_validation(path, key, kept, report)                         # then keep it for the next start

Design choices:
- The key is a SHA-256 over everything the result depends on: each data file's absolute path, size and
  mtime (and those of any file a source's reader options name, such as Basic-VLM's image map; and of each
  file of a table folder or pattern, `vlm.data.formats.table`), each
  source's mix settings (format, repeat, max_samples, options), each image folder's path and mtime, the
  tokenizer (its serialised `tokenizers` model, or vocabulary, plus special tokens and chat template), the
  checker's settings (template, num_image_tokens, max length, truncation, check_images, escaping, seed), and
  the vlm version. Any change makes another key, so another file: nothing is invalidated in place.
- Images are not each stat-ed (as costly as the `exists` check itself); an image folder's own mtime changes
  when a file is added to or removed from it, but not for its subfolders. Images that go missing after the
  check are still caught while training (`vlm.train.data_drops`); to check again, delete `.vlm_cache`.
- A cache file is trusted only when it parses, names the same key, and its indices are sorted, in range and as
  many as the report says; otherwise it is ignored (and recomputed by the caller), never half-used.
- Written atomically (a temporary file, then `os.replace`): a reader sees the old file, the new one, or none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from vlm.data.errors import DataError
from vlm.data.formats.table import is_pattern, table_files

CACHE_DIR = ".vlm_cache"
_FORMAT = 1  # bump when the stored layout or the checks change meaning


def _stat(path: str) -> list:
    """[absolute path, size, mtime_ns], or [absolute path, None, None] when it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return [os.path.abspath(path), None, None]
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _source_part(source: Any) -> dict:
    fields = dataclasses.asdict(source) if dataclasses.is_dataclass(source) else {"path": str(source)}
    option_files = [_stat(v) for opts in (fields.get("options") or {}, fields.get("shared_options") or {})
                    for v in opts.values() if isinstance(v, str) and os.path.isfile(v)]
    folder = fields.get("image_folder")
    return {"source": fields, "file": _stat(fields["path"]), "option_files": option_files,
            "image_folder": _stat(folder) if folder else None, "table_files": _table_files(fields["path"])}


def _table_files(path: str) -> list:
    """The files behind a table folder or pattern (their rewrite leaves the folder's own stat unchanged)."""
    if not (os.path.isdir(path) or is_pattern(Path(path))):
        return []
    try:
        return [_stat(str(f)) for f in table_files(Path(path))]
    except DataError:
        return []


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's ids: its serialised `tokenizers` model when it has one (vocabulary,
    merges, normalizer, added tokens), else its vocabulary; its special tokens and chat template; its class."""
    h = hashlib.sha256()
    if tokenizer is None:
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if callable(to_str):
        h.update(to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    extras = {"class": type(tokenizer).__name__,
              "special": getattr(tokenizer, "all_special_tokens", None),
              "special_map": getattr(tokenizer, "special_tokens_map", None),
              "chat_template": getattr(tokenizer, "chat_template", None),
              "bos": getattr(tokenizer, "add_bos_token", None), "eos": getattr(tokenizer, "add_eos_token", None)}
    h.update(json.dumps(extras, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def validation_key(sources: Sequence[Any], tokenizer: Any, settings: dict) -> str:
    """The cache key (hex) of checking `sources` with `tokenizer` under `settings` (plain JSON values)."""
    from vlm import __version__

    parts = {"format": _FORMAT, "vlm": __version__, "sources": [_source_part(s) for s in sources],
             "tokenizer": tokenizer_fingerprint(tokenizer), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def cache_path(output_dir: str, key: str) -> str:
    return os.path.join(output_dir, CACHE_DIR, f"validation-{key}.json")


def read_validation(path: str, key: str, *, total: int) -> tuple[tuple[list[int], dict] | None, str]:
    """((kept indices, report), "") when `path` holds a sound result for `key` over `total` samples; else
    (None, why not): "absent", or why the file cannot be trusted (the caller checks again)."""
    if not os.path.isfile(path):
        return None, "absent"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        kept, report = data["kept"], data["report"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    if data.get("key") != key or data.get("format") != _FORMAT:
        return None, "written for another key"
    if not (isinstance(kept, list) and all(type(i) is int for i in kept) and isinstance(report, dict)
            and isinstance(report.get("dropped"), dict) and isinstance(report.get("problems"), list)):
        return None, "malformed"
    if report.get("total") != total or report.get("kept") != len(kept) or kept != sorted(set(kept)) or (
            kept and not 0 <= kept[0] <= kept[-1] < total):
        return None, "inconsistent with the data"
    return (kept, report), ""


def write_validation(path: str, key: str, kept: list[int], report: dict) -> None:
    """Store the result atomically (temporary file in the same folder, then `os.replace`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": _FORMAT, "key": key, "kept": kept, "report": report}, f, ensure_ascii=False)
    os.replace(tmp, path)
