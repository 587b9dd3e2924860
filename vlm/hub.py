"""Reading a `transformers` config by folder or Hub id, with the one-line error a user can act on.

`cache_dir` is the Hugging Face hub cache to read from (`--cache_dir`, as LLaVA passes
`cache_dir=training_args.cache_dir` to every `from_pretrained`); None is the default cache (`HF_HUB_CACHE`).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from vlm.errors import FolderError, MissingPathError

if TYPE_CHECKING:  # transformers is imported where a config is read: `vlm data --help` stays light
    from transformers import PretrainedConfig

# The files through which a folder asks `transformers` to import its own Python code (`auto_map`).
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def add_trust_remote_code_argument(parser: Any, what: str = "a model folder") -> None:
    """`--trust-remote-code` (also `--trust_remote_code`) on an argparse parser or group; see `check_remote_code`."""
    parser.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                        help=f"let {what} whose configs declare auto_map run its own Python code (default: refused)")


def remote_code_entries(folder: str | os.PathLike) -> list[tuple[str, Any]]:
    """(file, its `auto_map`) for each of the folder's config files that declares custom code; [] for a Hub id
    or a folder without any."""
    found = []
    for name in REMOTE_CODE_FILES:
        path = os.path.join(str(folder), name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue  # unreadable configs are reported by the loader that needs them
        if isinstance(data, dict) and data.get("auto_map"):
            found.append((path, data["auto_map"]))
    return found


def check_remote_code(folder: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """FolderError naming the file and its `auto_map` when a local folder declares its own code and the user did not
    pass --trust_remote_code. transformers would ask on a terminal (and run the code on "y") or, told False,
    load its built-in class instead of the one the folder means; either way the user should decide, knowingly."""
    if trust_remote_code or not os.path.isdir(str(folder)):
        return
    entries = remote_code_entries(folder)
    if entries:
        path, auto_map = entries[0]
        raise FolderError(
            f"{path} has auto_map {json.dumps(auto_map)[:200]}: the folder ships its own Python code, which vlm "
            "does not run; pass --trust_remote_code only if you trust that code, or use a folder without auto_map"
        )


def auto_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, cache_dir: str | None = None,
                   **kwargs: Any):
    """`AutoTokenizer.from_pretrained` with `trust_remote_code` always explicit (never transformers' prompt) and a
    folder with `auto_map` refused unless trusted (`check_remote_code`)."""
    from transformers import AutoTokenizer

    check_remote_code(name_or_path, trust_remote_code)
    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                                         **kwargs)


def pretrained_config(name_or_path: str, *, what: str, cache_dir: str | None = None,
                      trust_remote_code: bool = False) -> PretrainedConfig:
    """`AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir)`; MissingPathError naming `what`, the path
    and the cache looked in when it cannot be read (transformers' own message is several lines about networking).
    `trust_remote_code` is passed explicitly; refusing an `auto_map` folder is the entry points' job
    (`check_remote_code`), as they know whether the user trusted it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"the Hub cache --cache_dir {cache_dir!r}" if cache_dir else "the default Hub cache (HF_HUB_CACHE)"
        raise MissingPathError(
            f"{what} {name_or_path!r} is not found / could not be downloaded: not a readable local folder, not in "
            f"{where}, and not downloadable ({reason}); pass a local folder, or --cache_dir with the cache that holds it"
        ) from None
