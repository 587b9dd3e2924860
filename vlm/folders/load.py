"""`load_pretrained_model`: any supported model folder in, `(tokenizer, model, image_processor, context_len)` out.

As LLaVA's `llava.model.builder.load_pretrained_model`, but the kind of folder is read from its files,
never guessed from its name (`vlm.folders.kinds`: vlm folder, LoRA run, original LLaVA-1.5, llava-hf), and every
kind is built and loaded through the one strict path (`vlm.folders.build.build_and_load`).

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

import os
from typing import Any

import torch

from vlm.errors import ConfigError, FolderError
from vlm.folders.build import from_pretrained, read_folder_config
from vlm.folders.kinds import check_folder_files, folder_kind, load_image_processor, load_tokenizer, resolve_model_path

DEFAULT_CONTEXT = 2048


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
        raise ConfigError("pass either --load-8bit or --load-4bit, not both")
    from vlm.quantization import require_bitsandbytes

    require_bitsandbytes("--load-8bit" if load_8bit else "--load-4bit")
    return 8 if load_8bit else 4


def load_pretrained_model(model_path: str | os.PathLike, model_base: str | None = None, load_8bit: bool = False,
                          load_4bit: bool = False, device: str | torch.device = "cpu",
                          dtype: str | torch.dtype | None = None, cache_dir: str | None = None,
                          trust_remote_code: bool = False, force_base: bool = False,
                          attn_implementation: str | None = None, **kwargs: Any):
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
        attn_implementation: overrides the folder's ("sdpa", "eager", "flash_attention_2", "torch_varlen").
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
        raise ConfigError(
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
                                             trust_remote_code=trust_remote_code, force_base=force_base,
                                             attn_implementation=attn_implementation))
        else:
            from vlm.model import resolve_dtype
            from vlm.quantization import load_quantization_record

            recipe = load_quantization_record(folder, bits, resolve_dtype(dtype or read_folder_config(folder).dtype))
            # The injected (unmerged) adapters stay: the quantised base + LoRA is the model the run trained.
            model = load_lora_run(folder, model_base, dtype=dtype, device=device, quantization=recipe,
                                  cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                  force_base=force_base, attn_implementation=attn_implementation).get_base_model()
    elif kind == "vlm":
        model = from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    elif kind == "llava":
        from vlm.folders.llava_original import image_aspect_ratio, load_llava_original

        from vlm.config import read_json_object

        data = read_json_object(os.path.join(folder, "config.json"))
        model = load_llava_original(folder, tokenizer, dtype=dtype, vision_tower=kwargs.get("vision_tower"),
                                    cache_dir=cache_dir, attn_implementation=attn_implementation)
        aspect_ratio, fallback = image_aspect_ratio(data), model.vlm_config.vision.name_or_path
    else:
        from vlm.folders.llava_hf import load_llava_hf

        model = load_llava_hf(folder, dtype=dtype, attn_implementation=attn_implementation)
    if get_image_token_id(tokenizer) != model.vlm_config.image_token_id:
        raise FolderError(
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
