"""Model-folder I/O: safetensors only, sharded when large, strict on load.

Layout (DESIGN.md, Model folder): `config.json`, and `model.safetensors` or shards
`model-00001-of-0000N.safetensors` with `model.safetensors.index.json` (the same index format as
`transformers`). Tensors that alias another (tied embeddings) are written once; on load a missing key
is accepted only when it is tied to a key that was loaded.

Loading never holds the file beside the model: `lazy_state_dict` reads the headers only (`StoredTensor`: shape,
dtype, the file memory-mapped), and `load_state_dict_strict(..., assign=True)` reads one tensor at a time into a
fresh skeleton, each becoming the model's own tensor (as transformers' `from_pretrained` does). Load peak: 1.05x
the model's size for the 42M benchmark model, 2.04x before (bench/load.py, bench/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlm.errors import ConfigError, FolderError, MissingPathError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000; ints pass through."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if match is None:
        raise ConfigError(f"max_shard_size={size!r}: expected a number of bytes or a size like '5GB', '500MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _dedupe_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of tensors sharing storage (tied weights), contiguous and detached."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike,
                    max_shard_size: int | str = "5GB") -> list[str]:
    """Write tensors as one safetensors file, or shards plus an index; returns the file names."""
    os.makedirs(folder, exist_ok=True)
    tensors = _dedupe_aliases(state_dict)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    # Remove files of an earlier save so a folder never mixes two layouts.
    for old in os.listdir(folder):
        if old == WEIGHTS_INDEX_NAME or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old):
            os.remove(os.path.join(folder, old))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, WEIGHTS_NAME), metadata=metadata)
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, shard_name), metadata=metadata)
        weight_map.update({k: shard_name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names


INDEX_NAMES = (WEIGHTS_INDEX_NAME, "pytorch_model.bin.index.json")


def _in_hub_cache_blobs(folder: str, target: str) -> bool:
    """A Hub cache snapshot (`.../snapshots/<rev>/`) links its files to `.../blobs/`: that is not an escape."""
    snapshots = os.path.dirname(os.path.realpath(folder))
    if os.path.basename(snapshots) != "snapshots":
        return False
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return os.path.commonpath([target, blobs]) == blobs


def shard_path(folder: str | os.PathLike, shard: Any, index: str) -> str:
    """The path of one shard an index file names, refused (ValueError naming the index and the shard) unless it
    stays inside `folder`: a plain relative name, no absolute path, no `..`, no symlink leading out of the folder.
    A model folder is data: its index must not make us read (or later write) files elsewhere."""
    folder = str(folder)
    why = None
    if not isinstance(shard, str) or not shard:
        why = "is not a file name"
    elif os.path.isabs(shard) or shard.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", shard):
        why = "is an absolute path"
    elif ".." in re.split(r"[/\\]", shard):
        why = "goes up with '..'"
    else:
        path = os.path.join(folder, shard)
        root, target = os.path.realpath(folder), os.path.realpath(path)
        if os.path.commonpath([root, target]) != root and not _in_hub_cache_blobs(folder, target):
            why = f"is a symlink that leads out of the folder (to {target!r})"
    if why is not None:
        raise FolderError(f"{index}: shard {shard!r} {why}; shards must be files inside the model folder "
                          f"{folder!r}; fix or remove the index file")
    return os.path.join(folder, shard)


def check_weight_index(folder: str | os.PathLike) -> None:
    """Every shard named by the folder's index files (safetensors and torch) stays inside the folder
    (see `shard_path`); ValueError naming the index file and the shard otherwise. A no-op without index files."""
    for name in INDEX_NAMES:
        index = os.path.join(str(folder), name)
        if not os.path.isfile(index):
            continue
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FolderError(f"{index} is not a weight index ({type(exc).__name__}: {exc}); expected "
                              '{"weight_map": {tensor: shard file}}; fix or remove it') from None
        for shard in sorted(shards, key=str):
            shard_path(folder, shard, index)


def open_safetensors(path: str | os.PathLike):
    """A `safetensors.safe_open` handle (the file memory-mapped, nothing read yet); FolderError naming the file
    when it is truncated, not safetensors or has an absurd header (safetensors' own message names no file)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(os.fspath(path), framework="pt")
    except SafetensorError as exc:
        raise FolderError(f"{os.fspath(path)} is not a readable safetensors file ({exc}); it is truncated or corrupt: "
                          "save or download it again") from None


class StoredTensor:
    """One tensor of a safetensors file, not read yet: its `shape` and `dtype` come from the header; `load()` reads
    it (memory-mapped: resident only once used). Loaders pass these around (renaming keys moves them, the strict
    check reads their shapes) so a model is filled one tensor at a time, never beside a second copy of the file."""

    __slots__ = ("path", "key", "shape", "dtype", "_handle")

    def __init__(self, path: str, key: str, handle) -> None:
        from safetensors.torch import _getdtype

        info = handle.get_slice(key)
        self.path, self.key, self._handle = path, key, handle
        self.shape, self.dtype = torch.Size(info.get_shape()), _getdtype(info.get_dtype())

    def load(self) -> torch.Tensor:
        return self._handle.get_tensor(self.key)

    def __repr__(self) -> str:
        return f"StoredTensor({self.path!r}, {self.key!r}, shape={tuple(self.shape)}, dtype={self.dtype})"


def as_tensor(value: torch.Tensor | StoredTensor) -> torch.Tensor:
    """A tensor of a state dict that may hold `StoredTensor`s: read it when stored, else itself."""
    return value.load() if isinstance(value, StoredTensor) else value


def stored_tensors(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file as `StoredTensor`s (header read, data not)."""
    handle = open_safetensors(path)
    return {key: StoredTensor(os.fspath(path), key, handle) for key in handle.offset_keys()}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; ValueError naming the file when it is truncated, not safetensors
    or has an absurd header (safetensors' own message names no file)."""
    return {key: stored.load() for key, stored in stored_tensors(path).items()}


def read_pickled_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch pickle (`pytorch_model.bin`), read with `weights_only=True`, so nothing in it
    runs. A file holding anything else is refused naming the file; torch's own message would suggest
    `weights_only=False`, i.e. running the file's code, which we never do."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"unsupported GLOBAL (\S+)", str(exc))
        what = f" (it asks for {blocked.group(1)})" if blocked else ""
        raise FolderError(f"{os.fspath(path)} holds objects other than tensors{what}, code a pickle can run; it was "
                          "not loaded. Use a safetensors copy of these weights from a source you trust") from None
    except (RuntimeError, EOFError) as exc:  # truncated or not a torch file ("failed finding central directory")
        first = str(exc).split(". ")[0]
        raise FolderError(f"{os.fspath(path)} is not a readable PyTorch weights file ({first}); it is truncated or "
                          "corrupt: download it again") from None


def lazy_state_dict(folder: str | os.PathLike) -> dict[str, StoredTensor]:
    """The tensors of `model.safetensors` or of the shards `model.safetensors.index.json` names, as
    `StoredTensor`s: every header is read and checked now, no tensor data yet."""
    single = os.path.join(folder, WEIGHTS_NAME)
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return stored_tensors(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        state: dict[str, StoredTensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = shard_path(folder, shard, index)
            if not os.path.isfile(path):
                raise MissingPathError(f"shard {shard!r} listed in {index} is missing")
            state.update(stored_tensors(path))
        return state
    raise MissingPathError(
        f"no weights in {str(folder)!r}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (vlm saves safetensors only)"
    )


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read `model.safetensors` or the shards named by `model.safetensors.index.json` (all tensors at once; a
    model is loaded from `lazy_state_dict` instead, one tensor at a time)."""
    return {key: stored.load() for key, stored in lazy_state_dict(folder).items()}


def _alias_groups(module: nn.Module) -> dict[str, set[str]]:
    """name -> every name of the same tensor (tied parameters share one object)."""
    by_id: dict[int, set[str]] = defaultdict(set)
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        by_id[id(tensor)].add(name)
    return {name: group for group in by_id.values() for name in group}


def check_state_fits(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *,
                     source: str = "checkpoint", aliases: dict[str, set[str]] | None = None, hint: str = "") -> None:
    """FolderError listing missing, unexpected and mis-shaped keys unless `state_dict` has exactly the keys
    and shapes of `expected` (a key is also present when one of its `aliases`, tied names, is)."""
    aliases = aliases or {}
    missing = [k for k in expected if k not in state_dict and not (aliases.get(k, {k}) & state_dict.keys())]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        def show(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f" ... (+{len(items) - 20} more)" if len(items) > 20 else "")
        raise FolderError(
            f"{source} does not match the model: {len(missing)} missing key(s) [{show(missing)}], "
            f"{len(unexpected)} unexpected key(s) [{show(unexpected)}], "
            f"{len(mismatched)} shape mismatch(es) [{show(mismatched)}]{hint}"
        )


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor | StoredTensor], *,
                           source: str = "checkpoint", assign: bool = False) -> None:
    """Put every tensor of `state_dict` into `module`; raise FolderError listing missing, unexpected and
    mis-shaped keys first (nothing is loaded then).

    Tensors are taken one at a time, so `StoredTensor` values (`lazy_state_dict`) are read one by one and the
    file is never held beside the model. Each is copied into the module's tensor (converted to its dtype), or, with
    `assign=True` (a freshly built skeleton whose weights are uninitialised), a file tensor becomes the module's
    tensor itself (converted to the skeleton's dtype; tied names all get it; `requires_grad` kept), so the
    skeleton's own memory is never written and the load costs the weights once. Plain tensors are always copied:
    they may belong to someone else (another model's weights)."""
    aliases = _alias_groups(module)
    check_state_fits(state_dict, module.state_dict(), source=source, aliases=aliases)
    in_memory = {key: value for key, value in state_dict.items() if not isinstance(value, StoredTensor)}
    module.load_state_dict(in_memory, strict=False)
    for key, value in state_dict.items():
        if key in in_memory:
            continue
        if assign:
            _assign(module, aliases.get(key, {key}), value.load())
        else:
            module.load_state_dict({key: value.load()}, strict=False)


def _assign(module: nn.Module, names: set[str], tensor: torch.Tensor) -> None:
    """Make `tensor` (in the current tensor's dtype) the parameter or buffer of every name in `names`."""
    owner, _, leaf = next(iter(names)).rpartition(".")
    current = module.get_submodule(owner)._parameters.get(leaf)
    if current is None:
        current = module.get_submodule(owner)._buffers[leaf]
    with torch.no_grad():
        tensor = tensor.to(dtype=current.dtype, device=current.device)
        new = nn.Parameter(tensor, requires_grad=current.requires_grad) if isinstance(current, nn.Parameter) else tensor
    for name in names:
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        if leaf in sub._parameters:
            sub._parameters[leaf] = new
        else:
            sub._buffers[leaf] = new


def live_config(model: nn.Module, *, llm_config: dict[str, Any] | None = None):
    """The model's `vlm_config` with the sub-models' configs as they are now (the truth after e.g. resizing the
    embeddings for `<image>`, or unfreezing the tower); `llm_config` replaces the LLM's."""
    import dataclasses

    config = model.vlm_config
    return config.replace(
        llm=dataclasses.replace(config.llm, hf_config=model.config.to_dict() if llm_config is None else llm_config),
        vision=dataclasses.replace(config.vision, hf_config=model.vision_tower.model.config.to_dict(),
                                   frozen=model.vision_tower.frozen))


def weights_file(folder: str | os.PathLike) -> str:
    """The file a vlm folder's weights are read from (`model.safetensors`, else the shard index), named in errors."""
    single = os.path.join(str(folder), WEIGHTS_NAME)
    return single if os.path.isfile(single) else os.path.join(str(folder), WEIGHTS_INDEX_NAME)


def save_model(model: nn.Module, folder: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None,
               max_shard_size: int | str = "5GB") -> None:
    """Write `config.json` (refreshed from the live sub-models) and the weights of a VLM."""
    model.vlm_config = live_config(model)
    model.vlm_config.save(folder)
    save_state_dict(model.state_dict() if state_dict is None else state_dict, folder, max_shard_size)


def save_model_folder(folder: str | os.PathLike, model: nn.Module, *, tokenizer=None, image_processor=None,
                      state_dict: dict[str, torch.Tensor] | None = None, max_shard_size: int | str = "5GB") -> None:
    """The whole model folder of DESIGN.md: config, weights, tokenizer files and image-processor config.

    `state_dict` overrides the model's own (e.g. the consolidated one DeepSpeed ZeRO-3 hands to `_save`).
    """
    save_model(model, folder, state_dict=state_dict, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
