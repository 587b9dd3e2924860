"""What a run trains on: its data sources, its chat template, and the validated training dataset.

- `build_sources`: `--data_path/--image_folder/--data_format` (files, comma lists, a YAML mix), or
  Basic-VLM's `--captions_file` + `--image_map`.
- `template_for`: `--version` when given, else the start folder's template, `plain` in stage 1, the LLM's
  own chat template, else `vicuna_v1` (README, "Chat templates"); the choice and its reason are printed,
  and so is a stage-1 switch away from the start folder's template.
- `build_train_dataset`: every sample validated as training will use it (`vlm.data.check`), the report
  written to `data_report.json`, the run stopped past `--max_drop_ratio`; the result is cached in
  `<output_dir>/.vlm_cache` (`vlm.data.check_cache`) for resumes and the other ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os

from vlm.data.mix import Source, parse_sources
from vlm.errors import ConfigError


def build_sources(data_args) -> list[Source]:
    """`--data_path/--image_folder/--data_format`, or Basic-VLM's `--captions_file` + `--image_map`."""
    if data_args.captions_file:
        from vlm.data.formats.basic_vlm import image_folder_and_options

        folder, options = image_folder_and_options(data_args.captions_file, data_args.image_map,
                                                   data_args.image_folder)
        if "image_root" in options:  # Basic-VLM's train.sh: the image map's `path` fields say where images are
            print(f"data: no --image_folder; images are found at the image map's 'path' folders (under {folder})",
                  flush=True)
        return [Source(path=data_args.captions_file, image_folder=folder, format="basic_vlm", options=options,
                       allow_absolute_images=data_args.allow_absolute_image_paths)]
    if not data_args.data_path:
        raise ConfigError("no training data: pass --data_path (and --image_folder), or --captions_file/--image_map")
    sources = parse_sources(data_args.data_path, data_args.image_folder, data_format=data_args.data_format)
    if data_args.allow_absolute_image_paths:
        sources = [dataclasses.replace(s, allow_absolute_images=True) for s in sources]
    return sources


def build_train_dataset(data_args, training_args, tokenizer, image_processor, num_image_tokens: int,
                        template: str, *, preference: bool = False):
    """Validate every sample as training will use it, write the report, stop when too much is dropped.

    `preference`: the samples are preference pairs (`--method dpo`): a `vlm.data.preference.PreferenceDataset`,
    refused in one line when the data holds a plain conversation.

    The result is cached in `<output_dir>/.vlm_cache` (`vlm.data.check_cache`), keyed by the data files, the
    tokenizer, the template and the settings: a resume reuses it, and under torchrun process 0 checks and
    writes it while the others wait and read it."""
    from vlm.data.check import enforce_max_drop_ratio
    from vlm.data.dataset import SupervisedDataset
    from vlm.data.mix import MixedRecords

    records = MixedRecords(build_sources(data_args), seed=training_args.seed)
    kept, report = _validated(records, data_args, training_args, tokenizer, num_image_tokens, template)
    report_path = write_report(report, training_args, "data_report.json", label="data")
    enforce_max_drop_ratio(report, data_args.max_drop_ratio, report_path=report_path)
    if preference:
        _check_all_pairs(report)
    elif training_args.process_index == 0:
        _say_pairs_train_as_chosen(report)
    dataset_class = SupervisedDataset
    if preference:
        from vlm.data.preference import PreferenceDataset as dataset_class
    dataset = dataset_class(records, tokenizer, template, image_processor, num_image_tokens=num_image_tokens,
                                max_length=training_args.model_max_length, truncate=data_args.truncate, indices=kept,
                                escape_special_tokens=data_args.escape_special_tokens,
                                on_bad_image="replace")  # counted and stopped by vlm.train.data_drops
    flag = getattr(training_args, "group_by_modality_length", None)
    if flag is None and training_args.process_index == 0 and groups_by_modality(flag, dataset):
        print("data: image and text-only samples are mixed: grouped by modality and length "
              "(--group_by_modality_length False to turn off)", flush=True)
    return dataset


def _check_all_pairs(report: dict) -> None:
    """`--method dpo` on data that is not preference pairs: one line naming the first such file. A file's reader
    decides what its samples are (the preference readers give only pairs, the others never), so the validation
    report's source formats answer without reading the samples again."""
    from vlm.data.formats import PREFERENCE_FORMATS

    for source in report.get("notes", {}).get("sources", []):
        if source.get("format") not in PREFERENCE_FORMATS:
            raise ConfigError(f"--method dpo trains on preference pairs, but {source['path']} of --data_path is read as "
                              f"{source.get('format')!r}: plain conversation records (no 'chosen'/'rejected'); pass "
                              f"preference data ({', '.join(PREFERENCE_FORMATS)}), or --method sft")


def _say_pairs_train_as_chosen(report: dict) -> None:
    """Supervised training on preference data trains on prompt + chosen: said, once per such source."""
    from vlm.data.formats import PREFERENCE_FORMATS

    for source in report.get("notes", {}).get("sources", []):
        if source.get("format") in PREFERENCE_FORMATS:
            print(f"data: {source['path']} holds preference pairs ({source['format']}): --method sft trains on each "
                  "prompt with its chosen answer (--method dpo trains on the pairs)", flush=True)


def write_report(report: dict, training_args, name: str, *, label: str) -> str:
    """Process 0 writes the validation `report` to `<output_dir>/<name>` and prints its one-line summary; returns
    the path (the training data's `data_report.json`, the eval data's `eval_data_report.json`)."""
    path = os.path.join(training_args.output_dir, name)
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        dropped = ", ".join(f"{k}={v}" for k, v in report["dropped"].items()) or "none"
        print(f"{label}: {report['total']} samples, kept {report['kept']}, dropped: {dropped} (report: {path})",
              flush=True)
    return path


def groups_by_modality(flag: bool | None, dataset) -> bool:
    """`--group_by_modality_length` as given; when not given (None), on for data that mixes image and text-only
    samples (padding: 32% of a batch of 4 on a LLaVA-665K-like mix, 2.3% grouped; issue 12), off otherwise."""
    if flag is not None:
        return bool(flag)
    has_image = getattr(dataset, "has_image", ())
    return any(has_image) and not all(has_image)


def _validated(records, data_args, training_args, tokenizer, num_image_tokens: int, template: str):
    """(kept indices, report): from the cache when it holds this run's result, else checked and cached. Process 0
    goes first; the others wait at a barrier and read its file (and check themselves only when they cannot,
    e.g. an output folder that is not shared between nodes)."""
    from vlm.data.check import check_dataset
    from vlm.data.check_cache import cache_path, read_validation, validation_key, write_validation

    settings = dict(template=template, num_image_tokens=num_image_tokens, max_length=training_args.model_max_length,
                    truncate=data_args.truncate, check_images=data_args.check_images, seed=training_args.seed,
                    escape_special_tokens=data_args.escape_special_tokens)
    key = validation_key(records.sources, tokenizer, settings)
    path = cache_path(training_args.output_dir, key)
    main = training_args.process_index == 0
    with training_args.main_process_first(local=False, desc="data check"):  # no barrier in one process
        cached, why_not = read_validation(path, key, total=len(records))
        if cached is not None:
            if main:
                print(f"data: validation reused from {path} (same data files, tokenizer, template and settings; "
                      "delete it to check again)", flush=True)
            return cached
        if main and why_not != "absent":
            print(f"data: validation cache {path} ignored ({why_not}); checking again", flush=True)
        # only process 0 checks (the others wait for its file): it takes every CPU (default num_workers)
        kept, report = check_dataset(records, tokenizer=tokenizer, **settings)
        if main:
            write_validation(path, key, kept, report)
        return kept, report


_WHY = {"plain": "stage 1 (--tune_mm_mlp_adapter) trains on captions",
        "tokenizer": "the LLM's tokenizer has a chat template",
        "vicuna_v1": "the LLM's tokenizer has no chat template; LLaVA-1.5's default"}


def template_for(data_args, model_args, tokenizer=None, *, cache_dir: str | None = None) -> str:
    """`--version` when given; otherwise the start folder's recorded template (a vlm / LLaVA folder or LoRA
    run keeps the format it was trained on), `plain` in stage 1, the LLM's own chat template when its
    tokenizer has one, else `vicuna_v1`. The choice and its reason are printed; in stage 1 from a folder
    trained with another template, the line names both. `cache_dir`: the Hugging Face hub cache a Hub-id
    start point is read from (`--cache_dir`)."""
    if data_args.version:
        return data_args.version
    from vlm.data.templates import default_template_name
    from vlm.folders.kinds import model_kind

    start = model_args.model_name_or_path
    kind, folder = model_kind(start, cache_dir=cache_dir) if start else ("llm", None)
    trained_with = None
    if kind != "llm":
        from vlm.folders.kinds import default_template

        try:
            trained_with = default_template(folder, tokenizer)
        except ValueError:
            pass
    if trained_with is not None and not model_args.tune_mm_mlp_adapter:
        print(f"template: {trained_with!r}, the one {start!r} was trained with (--version to change)", flush=True)
        return trained_with
    name = default_template_name(tokenizer, captions_stage=model_args.tune_mm_mlp_adapter)
    if trained_with is not None and trained_with != name:  # stage 1 from a folder trained on conversations
        print(f"template: {name!r}, not {trained_with!r} that {start!r} was trained with, because {_WHY[name]} "
              f"(--version {trained_with} to keep it)", flush=True)
    else:
        print(f"template: {name!r} because {_WHY[name]} (--version to change)", flush=True)
    return name
