"""Train a VLM: `python train.py [--config FILE] --output_dir DIR [--flag value ...]`; no arguments runs the
embedded demo. `--output_dir` is required (in the flags or the `--config` file): the run's checkpoints, model
and data report go there, and a rerun there resumes from its checkpoints. `--deepspeed zero2|zero3` names
the configs shipped with the package.

Flags: LLaVA's (`--model_name_or_path --vision_tower --tune_mm_mlp_adapter --lora_enable ...`),
transformers' TrainingArguments, and Basic-VLM's (`--lora_rank --feature_proj_lr --target_modules ...`).
See `python train.py --help`. The work is `vlm.train.run.run(config)`; this file parses and exits
(`vlm.cli.train.main`, under the error policy of `vlm.errors`).
"""

import sys

from vlm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
