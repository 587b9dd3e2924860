"""Reading a `transformers` config by folder or Hub id, with the one-line error a user can act on.

`cache_dir` is the Hugging Face hub cache to read from (`--cache_dir`, as LLaVA passes
`cache_dir=training_args.cache_dir` to every `from_pretrained`); None is the default cache (`HF_HUB_CACHE`).
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


def pretrained_config(name_or_path: str, *, what: str, cache_dir: str | None = None) -> PretrainedConfig:
    """`AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir)`; FileNotFoundError naming `what`, the path
    and the cache looked in when it cannot be read (transformers' own message is several lines about networking)."""
    try:
        return AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir)
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"the Hub cache --cache_dir {cache_dir!r}" if cache_dir else "the default Hub cache (HF_HUB_CACHE)"
        raise FileNotFoundError(
            f"{what} {name_or_path!r} is not found / could not be downloaded: not a readable local folder, not in "
            f"{where}, and not downloadable ({reason}); pass a local folder, or --cache_dir with the cache that holds it"
        ) from None
