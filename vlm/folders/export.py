"""Checkpoint interchange: original LLaVA-1.5 and llava-hf folders in (`vlm.load_pretrained_model`), llava-hf out.

    vlm export --format llava-hf --model runs/demo/model OUT          (vlm.cli.export)
    vlm.folders.export.export("runs/demo/model", "OUT", format="llava-hf")

Key maps are declarative tables in `keymap.py`; `llava_hf.py` and `llava_original.py` hold the rest.
The source may be any folder `load_pretrained_model` reads (a LoRA run is merged first).
"""

from __future__ import annotations

import os

from vlm.errors import ConfigError

FORMATS = ("llava-hf",)


def export(model_path: str | os.PathLike, output: str | os.PathLike, *, format: str = "llava-hf",
           model_base: str | None = None, conv_mode: str | None = None, trust_remote_code: bool = False,
           force_base: bool = False) -> None:
    """Write the model at `model_path` to `output` in `format`; ConfigError for what the format cannot express.
    `trust_remote_code` and `force_base` are `vlm.folders.load.load_pretrained_model`'s."""
    from vlm.folders.llava_hf import export_llava_hf
    from vlm.folders.kinds import default_template, resolve_model_path
    from vlm.folders.load import load_pretrained_model

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; supported: {FORMATS}")
    folder = resolve_model_path(model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(folder, model_base, trust_remote_code=trust_remote_code,
                                                                 force_base=force_base)
    template = conv_mode or default_template(folder, tokenizer)
    export_llava_hf(model, output, tokenizer=tokenizer, image_processor=image_processor, template=template)
