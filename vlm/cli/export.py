"""`vlm export --format llava-hf --model FOLDER OUT`: write a model folder in another format (`vlm.folders.export`)."""

from __future__ import annotations

import argparse
import sys

from vlm.folders.export import FORMATS, export


def main(argv: list[str] | None = None) -> int:
    from vlm.folders.lora import add_force_base_argument
    from vlm.hub import add_trust_remote_code_argument

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
    export(args.model, output, format=args.format, model_base=args.model_base, conv_mode=args.conv_mode,
           trust_remote_code=args.trust_remote_code, force_base=args.force_base)
    print(f"{args.format} folder written to {output}", file=sys.stderr)
    return 0
