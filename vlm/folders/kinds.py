"""The kinds of model folders and their files, read from the files, never from a name; model paths and Hub ids;
the tokenizer and the chat template a folder records.

| kind       | folder                                        | recognised by                                      |
| ---------- | --------------------------------------------- | -------------------------------------------------- |
| `lora`     | vlm LoRA run (needs its base)                 | `adapter_config.json` (see `vlm.folders.lora`)     |
| `vlm`      | vlm model folder                              | `config.json` with `vision`/`llm`/`projector` sections |
| `llava`    | original LLaVA-1.5 (`LlavaLlamaForCausalLM`)  | `config.json` with `mm_vision_tower`               |
| `llava-hf` | llava-hf (`LlavaForConditionalGeneration`)    | `config.json` with `model_type: llava` and sub-configs |
| `llm`      | a plain decoder LLM (a start point of training, a LoRA base) | any other `config.json`             |

A folder whose config.json is damaged, or says vlm but is incomplete, is never taken for a plain LLM: reading it
raises, naming the file. A path that is neither a folder nor a Hub id in the cache (or downloadable) is a
`MissingPathError` naming it. The chat template lives in config.json (`VLMConfig.template`); folders saved
before it record it in `vlm_generation.json`, which `folder_template` still reads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from vlm.errors import ConfigError, FolderError, MissingPathError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's: marks a LoRA run
LEGACY_GENERATION_FILE = "vlm_generation.json"  # the template record of folders saved before VLMConfig.template


def is_lora_run(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME))


def is_llava_original_config(data: dict[str, Any]) -> bool:
    return "mm_vision_tower" in data or "mm_vision_tower" in data.get("text_config", {})


def is_llava_hf_config(data: dict[str, Any]) -> bool:
    return data.get("model_type") == "llava" and "vision_config" in data and "text_config" in data


def config_kind(data: dict[str, Any]) -> str | None:
    """'vlm', 'llava' or 'llava-hf' from a `config.json`'s content; None for anything else (e.g. a plain LLM)."""
    if {"vision", "llm", "projector"} & data.keys():  # a vlm config, complete or not: VLMConfig.load says what is wrong
        return "vlm"
    if is_llava_original_config(data):
        return "llava"
    if is_llava_hf_config(data):
        return "llava-hf"
    return None


def folder_kind(folder: str) -> str:
    """'lora', 'vlm', 'llava' or 'llava-hf'; MissingPathError/FolderError naming what is missing or unknown."""
    if not os.path.exists(folder):
        raise MissingPathError(f"model folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise MissingPathError(f"model path {folder!r} is a file, not a model folder")
    if is_lora_run(folder):
        return "lora"
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise MissingPathError(
            f"model folder {folder!r} has no config.json; expected a vlm model folder, a vlm LoRA run "
            "(adapter_config.json), an original LLaVA-1.5 folder or a llava-hf folder"
        )
    from vlm.config import read_json_object

    data = read_json_object(path)  # ConfigError naming the file when it is not a JSON object
    kind = config_kind(data)
    if kind is not None:
        return kind
    raise FolderError(
        f"{path} describes none of the supported models (model_type={data.get('model_type')!r}, architectures="
        f"{data.get('architectures')}): no vision/llm sections (vlm), no mm_vision_tower (LLaVA-1.5), no "
        "vision_config/text_config with model_type 'llava' (llava-hf)"
    )


# kind -> groups of files, each group satisfied by any one of its names
_REQUIRED_FILES: dict[str, list[tuple[str, ...]]] = {
    "vlm": [("model.safetensors", "model.safetensors.index.json"), TOKENIZER_FILES],
    "lora": [("adapter_model.safetensors",), ("non_lora_trainables.safetensors",), ("config.json",), TOKENIZER_FILES],
    "llava": [("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
              TOKENIZER_FILES],
    "llava-hf": [("model.safetensors", "model.safetensors.index.json"), TOKENIZER_FILES],
}


def check_folder_files(folder: str, kind: str) -> None:
    """MissingPathError listing every file group a `kind` folder lacks."""
    missing = [" or ".join(group) for group in _REQUIRED_FILES[kind]
               if not any(os.path.isfile(os.path.join(folder, name)) for name in group)]
    if missing:
        raise MissingPathError(
            f"{kind} model folder {folder!r} is incomplete; missing: {'; '.join(missing)}. Save the processor (tokenizer, "
            "image processor, template) beside a vlm model: vlm.VLMProcessor.for_model(model, tokenizer).save_pretrained(folder)"
        )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_hub_id(path: str) -> bool:
    """A path that does not exist here and could name a Hub repo (`name` or `owner/name`)."""
    return not os.path.exists(path) and bool(_HUB_ID.match(path)) and ".." not in path


def _hub_file(repo_id: str, name: str, cache_dir: str | None = None) -> str | None:
    """The local copy of one file of a Hub repo (the Hub cache, `cache_dir` when given; offline mode reads only
    the cache), or None."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, name, cache_dir=cache_dir)
    except Exception:  # absent, offline without a cached copy, unknown repo, no access: all mean "not there"
        return None


def model_kind(path: str | os.PathLike, *, cache_dir: str | None = None) -> tuple[str, str]:
    """What a model path or Hub id holds, read from its files, never from its name.

    Returns ('lora' | 'vlm' | 'llava' | 'llava-hf', local folder), a Hub id being fetched into the Hub cache
    (`cache_dir` when given, else the default one; only its `adapter_config.json`/`config.json` are read first,
    so a plain LLM is not downloaded here), or ('llm', path) for a decoder LLM (a folder whose config.json is
    none of the VLM kinds, or such a Hub id) that `transformers` loads by that name.

    Raises:
        MissingPathError: the path does not exist and no Hub id of that name is in the cache or downloadable; a
            folder without config.json.
        ConfigError: the folder's config.json is not a JSON object (a damaged folder is never a plain LLM).
    """
    path = str(path)
    if os.path.isdir(path):
        if is_lora_run(path):
            return "lora", path
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            folder_kind(path)  # MissingPathError: no config.json
        from vlm.config import read_json_object

        return config_kind(read_json_object(config)) or "llm", path
    check_readable(path, cache_dir=cache_dir)
    if _hub_file(path, ADAPTER_CONFIG_NAME, cache_dir) is not None:
        return "lora", resolve_model_path(path, cache_dir=cache_dir)
    from vlm.config import read_json_object

    kind = config_kind(read_json_object(_hub_file(path, "config.json", cache_dir)))
    return ("llm", path) if kind is None else (kind, resolve_model_path(path, cache_dir=cache_dir))


def check_readable(path: str | os.PathLike, *, cache_dir: str | None = None) -> None:
    """MissingPathError when `path` is neither a local folder nor a Hub id whose `config.json` can be read (from
    `cache_dir` when given): the one-line error for a model path that is not there, before any loading."""
    path = str(path)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise MissingPathError(f"model path {path!r} is a file; expected a model folder (or a Hub id)")
    if not _is_hub_id(path):
        raise MissingPathError(f"model path {path!r} does not exist")
    if _hub_file(path, "config.json", cache_dir) is not None:
        return
    where = f"the Hub cache --cache_dir {cache_dir!r}" if cache_dir else "the default Hub cache (HF_HUB_CACHE)"
    raise MissingPathError(
        f"model path {path!r} is not a local folder and its config.json was not found in {where} and could not be "
        "downloaded from the Hub (offline?); pass a local folder, or --cache_dir with the cache that holds it"
    )


def resolve_model_path(model_path: str | os.PathLike, *, cache_dir: str | None = None) -> str:
    """A local folder as is; otherwise a Hub id downloaded into the Hub cache (`cache_dir` when given)."""
    path = str(model_path)
    if os.path.isdir(path) or os.path.exists(path):
        return path
    if not _is_hub_id(path):
        raise MissingPathError(f"model folder {path!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, cache_dir=cache_dir)
    except Exception as exc:  # offline, unknown repo, no access: all mean "cannot get it"
        raise MissingPathError(
            f"model path {path!r} is not a local folder and could not be downloaded from the Hub "
            f"({type(exc).__name__}: {exc})"
        ) from None


def load_tokenizer(folder: str, *, trust_remote_code: bool = False):
    """The folder's tokenizer; a folder whose files declare their own code (`auto_map`) is refused unless
    `trust_remote_code` (see `vlm.hub.check_remote_code`)."""
    from vlm.hub import auto_tokenizer

    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise MissingPathError(
            f"model folder {folder!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the model with "
            "vlm.folders.weights.save_model_folder(folder, model, tokenizer=...)"
        )
    return auto_tokenizer(folder, trust_remote_code=trust_remote_code)


def load_image_processor(folder: str, model, *, aspect_ratio: str | None = None, fallback: str | None = None,
                         cache_dir: str | None = None):
    """The folder's `preprocessor_config.json`, else `fallback`'s (the tower's folder or Hub id, read through
    `cache_dir`), else the tower type's defaults; in the aspect mode `aspect_ratio`, else the one the model's config
    records (`image_aspect_ratio`, what training used), else the processor's own."""
    import dataclasses

    from vlm.visual.processor import PREPROCESSOR_CONFIG_NAME, ImageProcessor

    aspect_ratio = aspect_ratio or model.vlm_config.image_aspect_ratio
    processor = None
    if os.path.isfile(os.path.join(folder, PREPROCESSOR_CONFIG_NAME)):
        processor = ImageProcessor.from_pretrained(folder)
    elif fallback:
        try:
            processor = ImageProcessor.from_pretrained(fallback, cache_dir=cache_dir)
        except FileNotFoundError:
            processor = None
    if processor is None:
        processor = ImageProcessor.from_vision_config(model.vlm_config.vision.hf_config, aspect_ratio=aspect_ratio or "pad")
    if aspect_ratio is not None and processor.config.aspect_ratio != aspect_ratio:
        processor = ImageProcessor(dataclasses.replace(processor.config, aspect_ratio=aspect_ratio))
    processor.check_fits(model.vision_tower.image_size, os.path.join(folder, PREPROCESSOR_CONFIG_NAME))
    return processor


def legacy_template(folder: str | os.PathLike) -> str | None:
    """The template in a folder's `vlm_generation.json` (folders saved before `VLMConfig.template`), or None."""
    from vlm.config import read_json_object

    path = os.path.join(str(folder), LEGACY_GENERATION_FILE)
    if not os.path.isfile(path):
        return None
    template = read_json_object(path).get("template")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{path}: template={template!r} must be a template name")
    return template or None


def folder_template(folder: str | os.PathLike) -> str | None:
    """The chat template a model folder (vlm folder, LoRA run, or a Hub id's cached snapshot) records it was trained
    with: config.json's `template`, else the legacy `vlm_generation.json`'s; None when it records none."""
    from vlm.config import read_json_object

    kind, local = model_kind(str(folder))
    if not os.path.isdir(local):
        return None
    config = os.path.join(local, "config.json")
    if kind in ("vlm", "lora") and os.path.isfile(config):
        template = read_json_object(config).get("template")
        if template:
            return template
    return legacy_template(local)


def default_template(folder: str | os.PathLike, tokenizer) -> str:
    """The chat template to prompt a model folder with when the user names none: the one it records
    (`folder_template`), else `vicuna_v1` for an original LLaVA-1.5 folder (what it was trained with), else the
    tokenizer's own chat template; ConfigError when there is none of these."""
    recorded = folder_template(folder)
    if recorded:
        return recorded
    if model_kind(str(folder))[0] == "llava":
        return "vicuna_v1"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    raise ConfigError(
        f"model folder {str(folder)!r} records no chat template and its tokenizer has none; pass --conv-mode "
        "(plain, vicuna_v1, chatml, llama3)"
    )


def record_template(folder: str | os.PathLike, template: str) -> None:
    """Record `template` in a saved folder: in its config.json (a vlm folder or LoRA run), else in
    `vlm_generation.json` (a processor saved before its model; `folder_template` reads either)."""
    from vlm.config import VLMConfig, read_json_object

    config = os.path.join(str(folder), "config.json")
    if os.path.isfile(config) and config_kind(read_json_object(config)) == "vlm":
        VLMConfig.load(folder).replace(template=template).save(folder)
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(str(folder), LEGACY_GENERATION_FILE), "w", encoding="utf-8") as f:
        json.dump({"template": template}, f, indent=2)
        f.write("\n")
