"""Checkpoint interchange: original LLaVA-1.5 and llava-hf folders in (`vlm.load_pretrained_model`), llava-hf out.

    vlm export --format llava-hf --model runs/demo/model OUT
    vlm.folders.export.export("runs/demo/model", "OUT", format="llava-hf")

Key maps are declarative tables in `keymap.py`; `llava_hf.py` and `llava_original.py` hold the rest.
The source may be any folder `load_pretrained_model` reads (a LoRA run is merged first).
"""

from __future__ import annotations

import argparse
import os
import sys

FORMATS = ("llava-hf",)


def export(model_path: str | os.PathLike, output: str | os.PathLike, *, format: str = "llava-hf",
           model_base: str | None = None, conv_mode: str | None = None, trust_remote_code: bool = False,
           force_base: bool = False) -> None:
    """Write the model at `model_path` to `output` in `format`; ValueError for what the format cannot express.
    `trust_remote_code` and `force_base` are `vlm.folders.load.load_pretrained_model`'s."""
    from vlm.folders.load import load_pretrained_model, resolve_model_path
    from vlm.folders.llava_hf import export_llava_hf
    from vlm.generate.generator import default_template

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; supported: {FORMATS}")
    folder = resolve_model_path(model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(folder, model_base, trust_remote_code=trust_remote_code,
                                                                 force_base=force_base)
    template = conv_mode or default_template(folder, tokenizer)
    export_llava_hf(model, output, tokenizer=tokenizer, image_processor=image_processor, template=template)


def main(argv: list[str] | None = None) -> int:
    from vlm.hub import add_trust_remote_code_argument
    from vlm.folders.lora import add_force_base_argument

    parser = argparse.ArgumentParser(prog="vlm export", description="Export a model folder to another format.")
    parser.add_argument("output", nargs="?", default=None, help="folder to write")
    parser.add_argument("--output", dest="output_flag", default=None, help="same as the positional OUT")
    parser.add_argument("--format", default="llava-hf", choices=FORMATS, help="target format (default llava-hf)")
    parser.add_argument("--model", "--model-path", "--model_path", dest="model", required=True,
                        help="vlm model folder, LoRA run (with --model-base), or LLaVA-1.5 folder")
    parser.add_argument("--model-base", "--model_base", dest="model_base", default=None, help="base of a LoRA run")
    parser.add_argument("--conv-mode", "--conv_mode", dest="conv_mode", default=None,
                        help="chat template for the exported processor (default: the one the model was trained with)")
    add_trust_remote_code_argument(parser)
    add_force_base_argument(parser)
    args = parser.parse_args(argv)
    output = args.output or args.output_flag
    if output is None:
        parser.error("give the output folder: vlm export --format llava-hf --model PATH OUT")
    try:
        export(args.model, output, format=args.format, model_base=args.model_base, conv_mode=args.conv_mode,
               trust_remote_code=args.trust_remote_code, force_base=args.force_base)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"vlm export: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.format} folder written to {output}", file=sys.stderr)
    return 0
