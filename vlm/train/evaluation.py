"""Evaluation during training: the eval data, the optional generation metric, the checks of the eval flags.

    python train.py ... --eval_data_path eval.json --eval_steps 200 \\
        --eval_generation_samples 64 --eval_metric vqa --metric_for_best_model eval_vqa --load_best_model_at_end

What the Trainer logs at each evaluation (`metrics.jsonl`, the loss plot, `--report_to`):
- `eval_loss`: transformers' own, `Trainer.evaluate` over the whole eval set with the run's collator (packed
  or padded) and the supervised-only loss (`VLMTrainer.prediction_step` asks the model to skip the (B, T, V)
  logits, as transformers does for Liger kernels: `skip_logits`);
- `eval_<metric>` when `--eval_generation_samples N` > 0: greedy answers to the first N eval samples (the
  conversation up to its last user turn) through the one decode loop (`vlm.generate.generator.Generator.
  reply_many`) with the run's template, scored as `vlm eval` scores them (`vlm.eval.items.eval_item`: the
  references are the final reply or `--eval_references_field`, VQA's ten answers; `vlm.eval.metrics.corpus_scores`).

Design choices:
- The eval data is read and validated exactly like the training data (`vlm.train.dataset`: same readers, same
  `vlm.data.check`, same cache, `--max_drop_ratio`); its report is `eval_data_report.json`.
- Under torchrun the generation metric is computed by process 0 alone on the unwrapped model (no collective
  runs inside `generate` under DDP) and broadcast, so every rank logs and compares the same value; under
  DeepSpeed ZeRO-3 or FSDP every rank would have to decode in lockstep, so the metric is refused there.
- `--eval_steps N` alone sets `--eval_strategy steps` (as a user of the Trainer expects); an eval strategy
  without `--eval_data_path`, eval data without a strategy, or a `--metric_for_best_model` the evaluation never
  logs is a ConfigError before anything is built (transformers would fail at the first evaluation, hours in).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vlm.errors import ConfigError

EVAL_REPORT = "eval_data_report.json"
EVAL_METRICS = ("exact", "vqa", "chartqa", "choice")
GENERATION_HEADROOM = 8  # new tokens beyond the longest reference: room for an end-of-turn token and a near-miss


def _strategy(value) -> str:
    return getattr(value, "value", value)


def check_evaluation(data_args, training_args) -> None:
    """The eval flags together (`RunConfig.__post_init__`); each names the flag and the way out."""
    evaluating = _strategy(training_args.eval_strategy) != "no"
    if evaluating and not data_args.eval_data_path:
        given = f"--eval_steps {training_args.eval_steps}" if training_args.eval_steps else \
            f"--eval_strategy {_strategy(training_args.eval_strategy)}"
        raise ConfigError(f"{given} evaluates during training but there is no eval data: add --eval_data_path FILE "
                          "(and --eval_image_folder), or drop the flag")
    if data_args.eval_data_path and not evaluating:
        raise ConfigError(f"--eval_data_path {data_args.eval_data_path}: say when to evaluate with --eval_steps N "
                          "(or --eval_strategy epoch), or drop the flag")
    if data_args.eval_image_folder and not data_args.eval_data_path:
        raise ConfigError("--eval_image_folder without --eval_data_path: add the eval data, or drop the flag")
    if training_args.eval_generation_samples and not data_args.eval_data_path:
        raise ConfigError("--eval_generation_samples needs --eval_data_path (the samples it answers)")
    if data_args.eval_references_field and not training_args.eval_generation_samples:
        raise ConfigError(f"--eval_references_field {data_args.eval_references_field} names the answers of the "
                          "generation metric: add --eval_generation_samples N, or drop the flag")
    if training_args.eval_generation_samples and (training_args.deepspeed and _zero3(training_args.deepspeed)
                                                   or training_args.fsdp):
        raise ConfigError("--eval_generation_samples under DeepSpeed ZeRO-3 or FSDP is not supported (every rank "
                          "would have to decode in lockstep): use --eval_generation_samples 0 (eval_loss only), "
                          "or ZeRO-2 / DDP")
    best = training_args.metric_for_best_model
    if best is not None and evaluating:
        name = best if best.startswith("eval_") else f"eval_{best}"
        logged = {"eval_loss"} | ({f"eval_{training_args.eval_metric}"} if training_args.eval_generation_samples
                                  else set())
        if name not in logged:
            raise ConfigError(f"--metric_for_best_model {best}: the evaluation logs only {', '.join(sorted(logged))} "
                              "(eval_<metric> needs --eval_generation_samples N and that --eval_metric)")


def _zero3(deepspeed) -> bool:
    if isinstance(deepspeed, dict):
        config = deepspeed
    else:
        try:
            with open(deepspeed, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return False  # transformers reports an unreadable config itself
    return (config.get("zero_optimization") or {}).get("stage") == 3


def eval_data_arguments(data_args):
    """The data section read for evaluation: `--eval_data_path` with `--eval_image_folder` (default
    `--image_folder`), every other data setting (format, checks, truncation) the training data's."""
    return dataclasses.replace(data_args, data_path=data_args.eval_data_path,
                               image_folder=data_args.eval_image_folder or data_args.image_folder,
                               captions_file=None, image_map=None)


def build_eval_dataset(data_args, training_args, tokenizer, image_processor, num_image_tokens: int,
                       template: str):
    """The eval `SupervisedDataset`, validated as the training data is (same readers and checks, cached, stopped
    past `--max_drop_ratio`), its report in `<output_dir>/eval_data_report.json`."""
    from vlm.data.check import enforce_max_drop_ratio
    from vlm.data.dataset import SupervisedDataset
    from vlm.data.mix import MixedRecords
    from vlm.train.dataset import _validated, build_sources, write_report

    eval_args = eval_data_arguments(data_args)
    # meta kept: a --eval_references_field, a choice question's options (vlm.eval.items)
    records = MixedRecords(build_sources(eval_args), seed=training_args.seed, keep_meta=True)
    kept, report = _validated(records, eval_args, training_args, tokenizer, num_image_tokens, template)
    report_path = write_report(report, training_args, EVAL_REPORT, label="eval data")
    enforce_max_drop_ratio(report, data_args.max_drop_ratio, report_path=report_path)
    return SupervisedDataset(records, tokenizer, template, image_processor, num_image_tokens=num_image_tokens,
                             max_length=training_args.model_max_length, truncate=data_args.truncate, indices=kept,
                             escape_special_tokens=data_args.escape_special_tokens,
                             on_bad_image="replace")  # an image gone bad since the check: its neighbour instead


def generation_items(dataset, n: int, metric: str, references_field: str | None = None) -> list[tuple[Any, Any]]:
    """(`vlm.eval.items.EvalItem`, image folder) of the first `n` samples of the eval dataset (its order, kept
    samples only), made as `vlm eval` makes its items (`eval_item`): the prompt is the conversation up to its last
    user turn; the references are the final reply, or the record's `references_field` (VQA's ten answers); the
    options for `choice`. A sample that cannot be scored so is a ConfigError before training starts."""
    from vlm.data.errors import SampleError
    from vlm.eval.items import eval_item

    items = []
    for index in range(min(n, len(dataset))):
        sample, folder, where = dataset.record(index)
        try:
            items.append((eval_item(sample, index, metric, folder, references_field), folder))
        except SampleError as exc:  # vlm eval's flag names in its message are ours here
            detail = exc.detail.replace("--references_field", "--eval_references_field").replace(
                "--metric ", "--eval_metric ")
            raise ConfigError(f"--eval_generation_samples {n} --eval_metric {metric}: eval sample {index} (id "
                              f"{sample.get('id')!r}, {where}): {detail}") from None
    return items


class GenerationEval:
    """`eval_<metric>` of the greedy answers to the first N eval samples (`VLMTrainer.evaluation_loop` calls it).

    Args:
        dataset: the eval `SupervisedDataset`.
        n: how many of its first samples to answer.
        metric: an `EVAL_METRICS` name (`vlm.eval.metrics`, scored as `vlm eval` scores it).
        references_field: the records' field holding the reference answers (None: the final reply).
        template: the run's chat template.
        batch_size: questions decoded together (the run's --per_device_eval_batch_size).
        max_new_tokens: the answer budget; None: the longest reference's tokens + `GENERATION_HEADROOM` (an answer
            that has not stopped by then is wrong anyway).
    """

    def __init__(self, dataset, n: int, metric: str, *, template: str, batch_size: int,
                 references_field: str | None = None, max_new_tokens: int | None = None):
        if metric not in EVAL_METRICS:
            raise ConfigError(f"--eval_metric {metric!r}: expected one of {', '.join(EVAL_METRICS)}")
        self.items = generation_items(dataset, n, metric, references_field)
        if not self.items:
            raise ConfigError("--eval_generation_samples: the eval data kept no sample to answer")
        self.max_new_tokens = max_new_tokens
        self.metric = metric
        self.template = template
        self.batch_size = batch_size

    @property
    def key(self) -> str:
        return f"eval_{self.metric}"

    def __call__(self, model, tokenizer, image_processor, *, process_index: int = 0) -> dict[str, float]:
        """{`eval_<metric>`: mean score}: computed by process 0 on `model` (the unwrapped VLM, LoRA layers
        included) and broadcast to the other processes of a torchrun."""
        value = [None]
        if process_index == 0:
            value = [self.compute(model, tokenizer, image_processor)[0]]
        _broadcast(value)
        return {self.key: value[0]}

    def compute(self, model, tokenizer, image_processor) -> tuple[float, list[str]]:
        """(mean score, the answers) on this process."""
        import torch

        from vlm.eval.metrics import corpus_scores
        from vlm.folders.load import context_length
        from vlm.generate.decoding import GenerationSettings
        from vlm.generate.generator import Generator
        from vlm.quantization import eval_mode

        items = [item for item, _ in self.items]
        budget = self.max_new_tokens or GENERATION_HEADROOM + max(
            len(tokenizer(r, add_special_tokens=False)["input_ids"]) for item in items for r in item.references)
        generator = Generator(model, tokenizer, image_processor, self.template, context_length(model, tokenizer),
                              GenerationSettings(temperature=0.0, max_new_tokens=budget))
        images = [[folder.open(image) for image in item.images] for item, folder in self.items]
        with eval_mode(model), torch.no_grad():  # 4-bit layers stay trainable (vlm.quantization.eval_mode)
            answers = generator.reply_many([item.messages for item in items], images, batch_size=self.batch_size)
        scores = corpus_scores(self.metric, answers, [item.references for item in items],
                               options=[item.options for item in items])
        return scores[self.metric], answers


def _broadcast(value: list) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
