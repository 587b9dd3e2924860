"""Train a VLM: `python train.py [--config FILE] [--flag value ...]`; no arguments runs the embedded demo.

Flags: LLaVA's (`--model_name_or_path --vision_tower --tune_mm_mlp_adapter --lora_enable ...`),
transformers' TrainingArguments, and Basic-VLM's (`--lora_rank --feature_proj_lr --target_modules ...`).
See `python train.py --help`.
"""

import sys

from vlm.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
