"""The one strict build-and-load path every model-folder loader goes through, and the vlm folder's own loader.

`build_and_load(config, state)`: the skeleton of `config` built without initialising weights, tied, then loaded
strictly, so a missing, unexpected or mis-shaped key fails the same way for every folder kind and every loader
(`vlm.from_pretrained`, `vlm.load_pretrained_model`, `vlm.load`, `vlm merge-lora`, `vlm export`, training's start
points): a `FolderError` naming the weights file(s) and the keys. The formats' own rules (LLaVA's rows for
`<image>`, a LoRA run's tensors over its base's) are an `adapt_state` step before the check, not another copy.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from vlm.errors import ConfigError, FolderError
from vlm.folders.kinds import folder_kind, legacy_template


def build_and_load(config, state: dict[str, torch.Tensor], *, source: str, config_source: str | None = None,
                   dtype: str | torch.dtype | None = None, attn_implementation: str | None = None,
                   pretrained_tower: bool = False, cache_dir: str | None = None,
                   adapt_state: Callable[[dict, torch.nn.Module], dict] | None = None):
    """The model `config` describes holding exactly the tensors of `state`, in eval mode: what every loader of
    every folder kind does (vlm folders, LoRA runs, LLaVA-1.5, llava-hf).

    The skeleton is built without initialising weights (`no_init_weights`), tied (tied keys are saved once),
    then loaded strictly: a missing, unexpected or mis-shaped key is a `FolderError` naming `source` (the
    weights file(s)) and the keys. `state` may hold `StoredTensor`s (`vlm.folders.weights.lazy_state_dict`, keys
    renamed as needed): each is read when its turn comes and becomes the skeleton's tensor (converted to its
    dtype), so the load peak is the model's size, not the model plus the file.

    Args:
        config: the VLMConfig to build; `config_source` (its file) prefixes a ConfigError the build raises.
        dtype, attn_implementation: override the config's.
        pretrained_tower: load the vision tower's own pretrained weights (`vision.name_or_path`, read through
            `cache_dir`); `adapt_state` then takes the tower tensors the checkpoint lacks from the model.
        adapt_state: `(state, model) -> state`, run on the skeleton before the strict check: a format's own
            rules (rows added for `<image>`, a LoRA run's non-LoRA tensors over its base's).
    """
    from transformers.initialization import no_init_weights

    from vlm.folders.weights import load_state_dict_strict
    from vlm.model import build_model

    try:
        with no_init_weights():
            model = build_model(config, load_weights=pretrained_tower, dtype=dtype,
                                attn_implementation=attn_implementation, cache_dir=cache_dir)
    except ConfigError as exc:  # the folder's config describes a model that cannot be built: name the file
        if config_source is None or str(exc).startswith(config_source):
            raise
        raise ConfigError(f"{config_source}: {exc}") from None
    model.tie_weights()  # no_init_weights also skips tying
    if adapt_state is not None:
        state = adapt_state(state, model)
    load_state_dict_strict(model, state, source=source, assign=True)  # StoredTensors: one at a time, no copy
    return model.eval()


def read_folder_config(folder: str | os.PathLike):
    """The VLMConfig of a vlm folder or LoRA run, with the template of `vlm_generation.json` when config.json
    records none (folders saved before `VLMConfig.template`)."""
    from vlm.config import VLMConfig

    config = VLMConfig.load(folder)
    if config.template is None:
        legacy = legacy_template(folder)
        if legacy is not None:
            config = config.replace(template=legacy)
    return config


def from_pretrained(folder: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, attn_implementation: str | None = None):
    """A vlm model folder (`config.json` + safetensors, as `save_pretrained` writes it) as a model in eval mode;
    strict on keys (`build_and_load`). `dtype` converts after loading (the weights load in the saved dtype)."""
    from vlm.folders.weights import lazy_state_dict, weights_file
    from vlm.model import dtype_name, resolve_dtype

    folder = str(folder)
    kind = folder_kind(folder)  # MissingPathError / FolderError naming what is missing or unknown
    if kind != "vlm":
        raise FolderError(f"{folder!r} is a {kind} folder, not a vlm model folder; load it with "
                          "vlm.load_pretrained_model (or vlm.load), which reads every kind")
    config = read_folder_config(folder)
    state = lazy_state_dict(folder)  # headers only: the tensors are read one at a time into the skeleton
    model = build_and_load(config, state, source=weights_file(folder), attn_implementation=attn_implementation,
                           config_source=os.path.join(folder, "config.json"))
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
        model.vlm_config = model.vlm_config.replace(dtype=dtype_name(dtype))
    if device is not None:
        model = model.to(device)
    return model.eval()
