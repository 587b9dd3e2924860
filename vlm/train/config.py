"""`RunConfig`: one training run, typed and validated, the single argument of `vlm.train.run.run`.

Three sections, each a dataclass whose field names are the flag names (`vlm.train.arguments`, the one
place that parses flags and knows their legacy spellings, builds them from a command line; the demo and
tests build them directly):
- `model` (`ModelArguments`): what the run starts from and which parts train (stage 1/2);
- `data` (`DataArguments`): what it trains on, the chat template, validation;
- `training` (`VLMTrainingArguments`): transformers' `TrainingArguments` plus the LoRA/QLoRA, learning-rate
  and length settings; kept as transformers' class because `transformers.Trainer` runs the loop.
`final_dir` is where the trained model folder goes (default: the output folder itself).

Validated once, when built: each section in its own `__post_init__` (flag values, packages), the
combinations here. The config and its model and data sections are then read-only (frozen dataclasses);
the training section stays writable because the Trainer writes to its own arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm.errors import ConfigError
from vlm.train.evaluation import check_evaluation
from vlm.train.arguments import (DataArguments, ModelArguments, VLMTrainingArguments, check_fixed_values,
                                  check_output_dir_given, parse_args, with_shipped_deepspeed_config)


@dataclass(frozen=True)
class RunConfig:
    model: ModelArguments
    data: DataArguments
    training: VLMTrainingArguments
    final_dir: str | None = None  # the trained model folder; None: `training.output_dir`

    def __post_init__(self):
        for name, kind in (("model", ModelArguments), ("data", DataArguments), ("training", VLMTrainingArguments)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"RunConfig.{name} must be a {kind.__name__}, not {type(getattr(self, name)).__name__}")
        check_fixed_values(self.model, self.data)
        if self.model.tune_mm_mlp_adapter and self.training.lora_enable:
            raise ConfigError("--tune_mm_mlp_adapter (stage 1) trains the projector only; drop --lora_enable")
        if not self.training.output_dir:
            raise ConfigError("no --output_dir: name the folder for this run's checkpoints, model and data report")
        if self.training.method == "dpo" and self.data.truncate != "none":
            raise ConfigError(f"--truncate {self.data.truncate} would cut a preference pair's answers: with --method dpo "
                              "too-long pairs are dropped; drop --truncate")
        if self.training.method == "dpo" and getattr(self.data, "eval_data_path", None):
            raise ConfigError("--eval_data_path is not supported with --method dpo yet (evaluation scores conversations, "
                              "not pairs): drop it")
        check_evaluation(self.data, self.training)

    @classmethod
    def from_flags(cls, argv: list[str]) -> "RunConfig":
        """`python train.py` flags (`vlm.train.arguments.parse_args`, and `--config FILE`); LLaVA's `--deepspeed
        ./scripts/zero3.json` names the shipped config; `--output_dir` is required, in the flags or the file."""
        model, data, training = parse_args(with_shipped_deepspeed_config(argv))
        check_output_dir_given(argv, training.output_dir)
        return cls(model=model, data=data, training=training)

    @property
    def model_dir(self) -> str:
        """Where the trained model folder is written."""
        return self.final_dir or self.training.output_dir

    @property
    def main_process(self) -> bool:
        """Process 0 of the run (the one that writes shared files and prints)."""
        return self.training.process_index == 0
