"""`vlm merge-lora --model-path RUN [--model-base BASE] --output OUT`: merge a LoRA run into its base model and
write a vlm model folder (`vlm.folders.lora.merge_lora_run`)."""

from __future__ import annotations

import argparse
import sys

from vlm.folders.lora import add_force_base_argument, merge_lora_run


def main(argv: list[str] | None = None) -> int:
    from vlm.hub import add_trust_remote_code_argument

    parser = argparse.ArgumentParser(prog="vlm merge-lora", description="Merge a LoRA run into its base model.")
    parser.add_argument("--model-path", "--model_path", dest="model_path", required=True, help="LoRA run folder")
    parser.add_argument("--model-base", "--model_base", dest="model_base", default=None,
                        help="vlm, LLaVA-1.5 or llava-hf folder, LLM folder or hub id (default: the base the run "
                             "records)")
    parser.add_argument("--output", "--save-model-path", "--save_model_path", dest="output", required=True,
                        help="folder to write the merged vlm model to")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the merged weights (default: the run's)")
    add_force_base_argument(parser)
    add_trust_remote_code_argument(parser)
    args = parser.parse_args(argv)
    merge_lora_run(args.model_path, args.output, args.model_base, dtype=args.dtype,
                   trust_remote_code=args.trust_remote_code, force_base=args.force_base)
    print(f"merged model written to {args.output}", file=sys.stderr)
    return 0
