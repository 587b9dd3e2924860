"""`load_pretrained_model`: any supported model folder in, `(tokenizer, model, image_processor, context_len)` out.

As LLaVA's `llava.model.builder.load_pretrained_model`, but the kind of folder is read from its files,
never guessed from its name:

| folder                                   | recognised by                                        |
| ---------------------------------------- | ---------------------------------------------------- |
| vlm LoRA run (needs the base)            | `adapter_config.json` (see `vlm.folders.lora`)                |
| vlm model folder                         | `config.json` with `vision` and `llm` sections       |
| original LLaVA-1.5 (`LlavaLlamaForCausalLM`) | `config.json` with `mm_vision_tower`             |
| llava-hf (`LlavaForConditionalGeneration`)   | `config.json` with `model_type: llava` and sub-configs |

LoRA runs are merged after loading (inference needs no adapter). 8-/4-bit loading (`vlm.quantization`)
loads the LLM's linear layers through bitsandbytes, on CUDA or on the CPU (bitsandbytes' CPU backend);
the vision tower, projector, embeddings and lm_head stay in 16/32 bits, as LLaVA. A LoRA run loaded
quantised is not merged: its adapters sit unmerged on the quantised base (quantised with the recipe the
run recorded), which is the model it was trained as; merging into 4-bit weights would be lossy.

A model folder is data, never code: one whose configs declare `auto_map` is refused unless the caller passes
`trust_remote_code=True` (`--trust-remote-code`; `vlm.hub.check_remote_code`), weight index files may only
name shards inside the folder (`vlm.folders.weights.check_weight_index`), and a LoRA run is refused on a base whose
weights differ from the one it recorded (`vlm.folders.lora.check_base_fingerprint`) unless `force_base=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DEFAULT_CONTEXT = 2048


def config_kind(data: dict[str, Any]) -> str | None:
    """'vlm', 'llava' or 'llava-hf' from a `config.json`'s content; None for anything else (e.g. a plain LLM)."""
    from vlm.folders.llava_hf import is_llava_hf_config
    from vlm.folders.llava_original import is_llava_original_config

    if "vision" in data and "llm" in data:
        return "vlm"
    if is_llava_original_config(data):
        return "llava"
    if is_llava_hf_config(data):
        return "llava-hf"
    return None


def folder_kind(folder: str) -> str:
    """'lora', 'vlm', 'llava' or 'llava-hf'; FileNotFoundError/ValueError naming what is missing or unknown."""
    from vlm.folders.lora import is_lora_run

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model path {folder!r} is not a folder (and not a hub id that could be downloaded)")
    if is_lora_run(folder):
        return "lora"
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model folder {folder!r} has no config.json; expected a vlm model folder, a vlm LoRA run "
            "(adapter_config.json), an original LLaVA-1.5 folder or a llava-hf folder"
        )
    from vlm.config import read_json_object

    data = read_json_object(path)  # ValueError naming the file when it is not a JSON object
    kind = config_kind(data)
    if kind is not None:
        return kind
    raise ValueError(
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
    """FileNotFoundError listing every file group a `kind` folder lacks."""
    missing = [" or ".join(group) for group in _REQUIRED_FILES[kind]
               if not any(os.path.isfile(os.path.join(folder, name)) for name in group)]
    if missing:
        raise FileNotFoundError(
            f"{kind} model folder {folder!r} is incomplete; missing: {'; '.join(missing)}. Save the processor (tokenizer, "
            "image processor, template) beside a vlm model: vlm.VLMProcessor.for_model(model, tokenizer).save_pretrained(folder)"
        )


def _is_hub_id(path: str) -> bool:
    return not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/"))


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
    so a plain LLM is not downloaded here), or ('llm', path) for anything else: a decoder LLM that
    `transformers` loads by that name.
    """
    from vlm.folders.lora import ADAPTER_CONFIG_NAME

    path = str(path)
    if os.path.isdir(path):
        try:
            return folder_kind(path), path
        except (ValueError, FileNotFoundError):  # a decoder LLM's own folder is none of the VLM kinds
            return "llm", path
    if not _is_hub_id(path):
        return "llm", path
    if _hub_file(path, ADAPTER_CONFIG_NAME, cache_dir) is not None:
        return "lora", resolve_model_path(path, cache_dir=cache_dir)
    config = _hub_file(path, "config.json", cache_dir)
    if config is None:
        return "llm", path
    with open(config, encoding="utf-8") as f:
        kind = config_kind(json.load(f))
    return ("llm", path) if kind is None else (kind, resolve_model_path(path, cache_dir=cache_dir))


def check_readable(path: str | os.PathLike, *, cache_dir: str | None = None) -> None:
    """FileNotFoundError when `path` is neither a local path nor a Hub id whose `config.json` can be read (from
    `cache_dir` when given): the one-line error for a start point that is not there, before any loading."""
    path = str(path)
    if os.path.exists(path) or not _is_hub_id(path) or _hub_file(path, "config.json", cache_dir) is not None:
        return
    where = f"the Hub cache --cache_dir {cache_dir!r}" if cache_dir else "the default Hub cache (HF_HUB_CACHE)"
    raise FileNotFoundError(
        f"model path {path!r} is not a local folder and its config.json was not found in {where} and could not be "
        "downloaded from the Hub (offline?); pass a local folder, or --cache_dir with the cache that holds it"
    )


def resolve_model_path(model_path: str | os.PathLike, *, cache_dir: str | None = None) -> str:
    """A local folder as is; otherwise a Hub id downloaded into the Hub cache (`cache_dir` when given)."""
    path = str(model_path)
    if os.path.isdir(path) or os.path.exists(path):
        return path
    if not _is_hub_id(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, cache_dir=cache_dir)
    except Exception as exc:  # offline, unknown repo, no access: all mean "cannot get it"
        raise FileNotFoundError(
            f"model path {path!r} is not a local folder and could not be downloaded from the Hub "
            f"({type(exc).__name__}: {exc})"
        ) from None


def load_tokenizer(folder: str, *, trust_remote_code: bool = False):
    """The folder's tokenizer; a folder whose files declare their own code (`auto_map`) is refused unless
    `trust_remote_code` (see `vlm.hub.check_remote_code`)."""
    from vlm.hub import auto_tokenizer

    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {folder!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the model with "
            "vlm.folders.weights.save_model_folder(folder, model, tokenizer=...)"
        )
    return auto_tokenizer(folder, trust_remote_code=trust_remote_code)


def load_image_processor(folder: str, model, *, aspect_ratio: str | None = None, fallback: str | None = None,
                         cache_dir: str | None = None):
    """The folder's `preprocessor_config.json`, else `fallback`'s (the tower's folder or Hub id, read through
    `cache_dir`), else the tower type's defaults."""
    from vlm.visual.processor import PREPROCESSOR_CONFIG_NAME, ImageProcessor

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


def context_length(model, tokenizer) -> int:
    """The longest sequence the model takes: its position limit, capped by the tokenizer's model_max_length."""
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**7:
        limit = min(limit, tok_limit)
    return int(limit)


def quantization_bits(load_8bit: bool, load_4bit: bool) -> int | None:
    """8, 4 or None from `--load-8bit/--load-4bit`, checked before anything is loaded."""
    if not (load_8bit or load_4bit):
        return None
    if load_8bit and load_4bit:
        raise ValueError("pass either --load-8bit or --load-4bit, not both")
    from vlm.quantization import require_bitsandbytes

    require_bitsandbytes("--load-8bit" if load_8bit else "--load-4bit")
    return 8 if load_8bit else 4


def load_pretrained_model(model_path: str | os.PathLike, model_base: str | None = None, load_8bit: bool = False,
                          load_4bit: bool = False, device: str | torch.device = "cpu",
                          dtype: str | torch.dtype | None = None, cache_dir: str | None = None,
                          trust_remote_code: bool = False, force_base: bool = False, **kwargs: Any):
    """Load any supported model folder for inference.

    Args:
        model_path: a vlm model folder, a vlm LoRA run, an original LLaVA-1.5 folder, a llava-hf folder, or
            a Hub id of one.
        model_base: for a LoRA run, its base (vlm folder, LLM folder or hub id; default: the run's
            `llm.name_or_path`). Refused for the other kinds, which carry all their weights.
        load_8bit / load_4bit: load the LLM's linear layers in 8/4 bits with bitsandbytes (CUDA or CPU).
        device: where to put the model ("cpu", "cuda", "cuda:1", ...).
        dtype: "float32" / "bfloat16" / "float16"; default: the folder's (float16 when quantising on CUDA,
            as LLaVA). When quantising it is also the 4-bit compute dtype.
        cache_dir: the Hugging Face hub cache every Hub id is read from (the model, a LoRA run's base, an original
            LLaVA folder's `mm_vision_tower` and its image processor); None: the default cache (`HF_HUB_CACHE`).
        trust_remote_code: let a folder whose files declare `auto_map` run its own code through transformers;
            False (default): such a folder is refused, naming the file (`vlm.hub.check_remote_code`).
        force_base: merge a LoRA run onto a base whose weights differ from the one it was trained on
            (`vlm.folders.lora.check_base_fingerprint`).
        kwargs: `vision_tower=` overrides LLaVA's `mm_vision_tower` (a local copy of the tower).

    Returns:
        (tokenizer, model in eval mode, ImageProcessor, context_len).
    """
    from vlm.data.tokenizer import get_image_token_id

    bits = quantization_bits(load_8bit, load_4bit)
    if bits is not None and dtype is None and str(device).startswith("cuda"):
        dtype = torch.float16
    folder = resolve_model_path(model_path, cache_dir=cache_dir)
    kind = folder_kind(folder)
    if model_base is not None and kind != "lora":
        raise ValueError(
            f"--model-base is only used with LoRA runs, but {folder!r} is a full {kind} model folder; drop --model-base"
        )
    check_folder_files(folder, kind)
    from vlm.folders.weights import check_weight_index
    from vlm.hub import check_remote_code

    check_remote_code(folder, trust_remote_code)
    check_weight_index(folder)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    aspect_ratio, fallback = None, None
    if kind == "lora":
        from vlm.folders.lora import load_lora_run, merge_lora

        if bits is None:
            model = merge_lora(load_lora_run(folder, model_base, dtype=dtype, cache_dir=cache_dir,
                                             trust_remote_code=trust_remote_code, force_base=force_base))
        else:
            from vlm.config import VLMConfig
            from vlm.model import resolve_dtype
            from vlm.quantization import load_quantization_record

            recipe = load_quantization_record(folder, bits, resolve_dtype(dtype or VLMConfig.load(folder).dtype))
            # The injected (unmerged) adapters stay: the quantised base + LoRA is the model the run trained.
            model = load_lora_run(folder, model_base, dtype=dtype, device=device, quantization=recipe,
                                  cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                  force_base=force_base).get_base_model()
    elif kind == "vlm":
        from vlm.model import from_pretrained

        model = from_pretrained(folder, dtype=dtype)
    elif kind == "llava":
        from vlm.folders.llava_original import image_aspect_ratio, load_llava_original

        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
        model = load_llava_original(folder, tokenizer, dtype=dtype, vision_tower=kwargs.get("vision_tower"),
                                    cache_dir=cache_dir)
        aspect_ratio, fallback = image_aspect_ratio(data), model.vlm_config.vision.name_or_path
    else:
        from vlm.folders.llava_hf import load_llava_hf

        model = load_llava_hf(folder, dtype=dtype)
    if get_image_token_id(tokenizer) != model.vlm_config.image_token_id:
        raise ValueError(
            f"the tokenizer in {folder!r} has <image> = {get_image_token_id(tokenizer)} but the model's image_token_id "
            f"is {model.vlm_config.image_token_id}; the folder mixes files of different models"
        )
    image_processor = load_image_processor(folder, model, aspect_ratio=aspect_ratio, fallback=fallback,
                                           cache_dir=cache_dir)
    if bits is not None and getattr(model, "hf_quantizer", None) is None:
        from vlm.quantization import bnb_config, quantize_llm

        model = quantize_llm(model, bnb_config(bits, compute_dtype=model.dtype), device=device)
    elif bits is None:
        model = model.to(device)
    model = model.eval()
    return tokenizer, model, image_processor, context_length(model, tokenizer)
