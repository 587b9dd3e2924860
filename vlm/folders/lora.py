"""LoRA for VLMs: wrap the LLM's linear layers with PEFT adapters, save/load a LoRA run, merge it.

Design choices:
- Only the LLM's `nn.Linear` layers get adapters (never `lm_head`, the vision tower or the projector), so
  the adapter's keys are exactly those of the plain `transformers` LLM: the adapter folder loads with
  `PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base), run)` as well as into a VLM.
- Targets are resolved to concrete module names first (default: every LLM linear; a list: exact name
  suffixes; a string with regex characters: names it matches at a dotted-name boundary, as Basic-VLM's
  `"c_attn|w1|w2"`). PEFT is then handed one compact, anchored regex of those names, so what it wraps
  is what we resolved, and a pattern that matches nothing is an error listing the candidates.
- The projector and the trainable part of the vision tower stay fully trainable beside the adapters
  (PEFT freezes everything; we restore their `requires_grad` after wrapping). They are saved in full
  in `non_lora_trainables.safetensors`, as original LLaVA does.

LoRA run folder layout (written by `save_lora_run`):

    adapter_config.json               PEFT's; base_model_name_or_path = what training started from: the
                                      LLM (`llm.name_or_path`) or a vlm / LLaVA-1.5 / llava-hf folder
    adapter_model.safetensors         PEFT's LoRA weights (keys `base_model.model.model.layers...lora_A.weight`)
    non_lora_trainables.safetensors   full tensors in vlm key layout: `vision_tower.*`, `mm_projector.*`,
                                      every other trainable non-LoRA parameter, and the input/output
                                      embeddings when the vocabulary differs from the base LLM's
    config.json                       the VLMConfig of the full model (vocabulary after resizing)
    quantization_config.json          only for QLoRA runs: the BitsAndBytesConfig the LLM was trained under
    base_fingerprint.json             sha256 of a few frozen base tensors (and a sample of their values): loading
                                      or merging onto a base with other weights is refused unless forced
    tokenizer files, preprocessor_config.json

`load_lora_run(run, model_base)` rebuilds the architecture from `config.json`, loads the base weights
(by default the adapter's recorded base; any folder or Hub id `vlm.folders.kinds.model_kind` knows, or an LLM),
overlays the non-LoRA trainables (the run's projector and tower must all be there), checks that the base
matches the run (dimensions, vocabulary, and the weights themselves through `base_fingerprint.json`: a
same-shaped but different base would merge silently into a wrong model) and attaches the adapter, strictly
(`vlm.folders.build.build_and_load`; the adapter file must hold exactly the model's adapter tensors).
`load_lora_checkpoint` restores a run into a live PEFT model (training's resume) with the same checks.
`merge_lora` folds the adapters into the weights (W + alpha/r * B @ A) and gives back a plain VLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import defaultdict
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from vlm.errors import ConfigError, FolderError, MissingPathError
from vlm.folders.kinds import ADAPTER_CONFIG_NAME
from vlm.folders.weights import read_safetensors

NON_LORA_NAME = "non_lora_trainables.safetensors"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
BASE_FINGERPRINT_NAME = "base_fingerprint.json"
_FINGERPRINT_TENSORS = 3
_FINGERPRINT_SAMPLE = 32
_NOT_LLM = ("vision_tower.", "mm_projector.")
_REGEX_CHARS = set("|()[]{}*+?^$\\")
# Qwen-1 (`QWenLMHeadModel`) layer names -> the layers doing the same job in Qwen2/Qwen2.5/LLaMA-style
# decoders: `c_attn` is the fused q/k/v projection, `c_proj` the attention output and the MLP output,
# and the MLP computes c_proj(w1(x) * silu(w2(x))), so w2 is the gate and w1 the up projection.
QWEN1_EQUIVALENTS: dict[str, tuple[str, ...]] = {
    "c_attn": ("q_proj", "k_proj", "v_proj"),
    "c_proj": ("o_proj", "down_proj"),
    "w1": ("up_proj",),
    "w2": ("gate_proj",),
}
# LLM config fields that must agree between a run and the base its adapter is loaded onto.
BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size")


# ---------------------------------------------------------------------------------------------------------
# Wrapping


def llm_linear_names(model: nn.Module) -> list[str]:
    """Names of the LLM's `nn.Linear` modules (no lm_head, vision tower or projector), in model order."""
    output = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.startswith(_NOT_LLM) and module is not output]


def translate_qwen1_targets(target_modules: str | Sequence[str], layer_kinds: set[str]) -> tuple[str | list[str], list[str]]:
    """Qwen-1 layer names in `target_modules` -> this LLM's equivalent layers, when the LLM has no such layer.

    `layer_kinds` are the last components of the LLM's linear layer names. A Qwen-1 name is replaced only
    when the model lacks it and has every one of its equivalents, so the choice follows the modules that
    exist, not the model's name. Returns (targets in the same form, one "old -> new" note per replacement);
    anything that is not a plain alternation (`a|b|c`) or a list of names is returned unchanged.
    """
    as_list = not isinstance(target_modules, str)
    parts = list(target_modules) if as_list else target_modules.split("|")
    if not all(re.fullmatch(r"\w+", part) for part in parts):
        return target_modules, []
    out: list[str] = []
    notes: list[str] = []
    for part in parts:
        equivalents = QWEN1_EQUIVALENTS.get(part, ())
        if part not in layer_kinds and equivalents and set(equivalents) <= layer_kinds:
            out.extend(equivalents)
            notes.append(f"{part} -> {', '.join(equivalents)}")
        else:
            out.append(part)
    return (out if as_list else "|".join(out)), notes


def resolve_target_modules(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> list[str]:
    """The LLM linear module names selected by `target_modules` (see the module docstring); ConfigError if none.

    Qwen-1 names (Basic-VLM's `"c_attn|w1|w2"`) on an LLM without them select the equivalent layers, with a
    printed note (see `translate_qwen1_targets`).
    """
    candidates = llm_linear_names(model)
    if target_modules is not None:
        translated, notes = translate_qwen1_targets(target_modules, {n.rsplit(".", 1)[-1] for n in candidates})
        if notes:
            print(f"note: target_modules={target_modules!r} names Qwen-1 layers this LLM does not have; LoRA goes on "
                  f"the equivalent layers: {'; '.join(notes)}", flush=True)
            target_modules = translated
    if target_modules is None:
        chosen = candidates
    elif isinstance(target_modules, str) and _REGEX_CHARS & set(target_modules):
        try:
            pattern = re.compile(rf"(?:^|\.)(?:{target_modules})$")
        except re.error as exc:
            raise ConfigError(f"target_modules={target_modules!r} is not a valid regular expression: {exc}") from None
        chosen = [name for name in candidates if pattern.search(name)]
    else:
        suffixes = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        chosen = [name for name in candidates if any(name == s or name.endswith("." + s) for s in suffixes)]
    if not chosen:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ConfigError(
            f"target_modules={target_modules!r} matches none of the LLM's linear layers; their names end in "
            f"{kinds} (e.g. {candidates[0] if candidates else 'none'}); use e.g. 'q_proj|v_proj' or omit it "
            "to adapt every linear layer"
        )
    return chosen


def _compact_regex(chosen: list[str], candidates: list[str]) -> str:
    """One anchored regex matching exactly `chosen` among `candidates`; layer indices folded to \\d+ when all are chosen."""
    def shape(name: str) -> str:
        return re.sub(r"\.\d+(?=\.|$)", ".#", name)

    all_by_shape: dict[str, set[str]] = defaultdict(set)
    for name in candidates:
        all_by_shape[shape(name)].add(name)
    chosen_by_shape: dict[str, set[str]] = defaultdict(set)
    for name in chosen:
        chosen_by_shape[shape(name)].add(name)
    parts = []
    for pattern_shape, names in chosen_by_shape.items():
        if names == all_by_shape[pattern_shape]:
            parts.append(re.escape(pattern_shape).replace("\\#", r"\d+").replace("#", r"\d+"))
        else:
            parts.extend(re.escape(name) for name in sorted(names))
    return "^(?:" + "|".join(parts) + ")$"


LORA_BIAS = ("none", "all", "lora_only")


def apply_lora(model: nn.Module, *, r: int, alpha: int, dropout: float = 0.05,
               target_modules: str | list[str] | None = None, bias: str = "none", base: str | None = None):
    """Wrap the LLM's linear layers of a VLM with LoRA adapters; returns a `peft.PeftModel`.

    Args:
        model: a VLM from `vlm.build_model` / `vlm.from_pretrained` (its LLM may be quantised, see
            `vlm.quantization.quantize_llm`: the adapters are then PEFT's bitsandbytes LoRA layers).
        r: LoRA rank; alpha: scaling numerator (scale = alpha / r); dropout: on the adapter input.
        target_modules: None (every LLM linear), a list of exact name suffixes (`["q_proj", "v_proj"]`),
            or a regex string matched at a name boundary (`"q_proj|v_proj"`, `"c_attn|w1|w2"`).
        bias: PEFT's `bias` (LLaVA's `--lora_bias`): "none"; "all" trains every bias of the LLM;
            "lora_only" trains the biases of the adapted layers. Trained biases are saved in the adapter.
        base: what the run starts from, recorded as the adapter's `base_model_name_or_path` (what
            `load_lora_run` loads by default): the model folder or Hub id training started from (a vlm,
            LLaVA-1.5, llava-hf folder or LoRA run); default the LLM, `llm.name_or_path`.

    The projector and the trainable parameters of the vision tower remain trainable; a frozen tower stays
    frozen, biases included (PEFT's "all" would otherwise reach it). Works with activation checkpointing
    (input embeddings are made to require grad) and `transformers.Trainer`.
    """
    from peft import LoraConfig, get_peft_model

    if getattr(model, "vlm_config", None) is None:
        raise TypeError(f"apply_lora expects a VLM built by vlm.build_model, got {type(model).__name__}")
    if r < 1:
        raise ConfigError(f"lora r={r} must be a positive rank")
    if bias not in LORA_BIAS:
        raise ConfigError(f"lora bias={bias!r}; expected one of {LORA_BIAS} (PEFT's LoraConfig.bias)")
    chosen = resolve_target_modules(model, target_modules)
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters() if name.startswith(_NOT_LLM)}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, task_type="CAUSAL_LM",
                        target_modules=_compact_regex(chosen, llm_linear_names(model)))
    peft_model = get_peft_model(model, config)
    for adapter_config in peft_model.peft_config.values():  # PEFT records the model's own name_or_path
        adapter_config.base_model_name_or_path = base or model.vlm_config.llm.name_or_path
    for name, p in model.named_parameters():
        if name in trainable_before:
            p.requires_grad_(trainable_before[name])
    model.enable_input_require_grads()  # gradients reach the adapters through checkpointed layers
    return peft_model


def load_adapter_weights(peft_model, folder: str | os.PathLike) -> None:
    """Initialise the adapter of `peft_model` from a PEFT adapter folder (`--lora_weight_path`).

    Strict: the folder's adapter must hold exactly the adapter tensors of `peft_model` (same targets, rank
    and bias mode), with the same shapes; otherwise FolderError lists what differs. Only the adapter is read:
    the projector and other non-LoRA weights come from the start model.
    """
    from peft.utils import set_peft_model_state_dict

    path = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise MissingPathError(f"--lora_weight_path {str(folder)!r} has no {ADAPTER_WEIGHTS_NAME}; it must be a PEFT "
                               "adapter folder (a vlm LoRA run or PeftModel.save_pretrained output)")
    saved = read_safetensors(path)
    check_adapter_fits(peft_model, saved, f"the adapter in --lora_weight_path {path!r}",
                       hint="; use the same --lora_r, --target_modules and --lora_bias as the run that saved it")
    set_peft_model_state_dict(peft_model, saved)


# ---------------------------------------------------------------------------------------------------------
# Saving


def _plain_name(name: str) -> str:
    """PEFT-wrapped parameter name -> the vlm key (`q_proj.base_layer.bias` -> `q_proj.bias`)."""
    return name.replace(".base_layer.", ".")


def add_force_base_argument(parser: Any) -> None:
    """`--force-base`: use a LoRA run's base even when its weights differ from the recorded fingerprint."""
    parser.add_argument("--force-base", "--force_base", dest="force_base", action="store_true",
                        help="use a base whose weights differ from the one the LoRA run was trained on "
                             "(base_fingerprint.json)")


def _base_vocab_size(name_or_path: str | None, cache_dir: str | None = None) -> int | None:
    """The base LLM's vocabulary size, or None when the base is unknown or cannot be read offline."""
    if not name_or_path:
        return None
    from transformers import AutoConfig

    try:  # only the vocabulary size is read: the folder's own code (auto_map) is never needed for that
        return AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir,
                                          trust_remote_code=False).get_text_config().vocab_size
    except (OSError, ValueError):
        return None


def non_lora_state(model, *, cache_dir: str | None = None,
                   state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors `non_lora_trainables.safetensors` holds (see the module docstring), vlm key layout
    (`cache_dir`: the Hugging Face hub cache the base LLM's config is read from). `state_dict`: the PeftModel's
    state dict (keys `base_model.model.*`) to take the values from, e.g. the consolidated one `transformers.Trainer`
    hands over under DeepSpeed ZeRO-3, where the live parameters are empty shards; default the live parameters."""
    vlm_model = model.get_base_model()
    state: dict[str, tuple[str, torch.Tensor]] = {}  # vlm key -> (parameter name, live tensor)
    for name, p in vlm_model.named_parameters():
        if "lora_" in name:
            continue
        if name.startswith(_NOT_LLM) or p.requires_grad:
            state[_plain_name(name)] = (name, p)
    embeddings = vlm_model.get_input_embeddings().weight
    base_vocab = _base_vocab_size(vlm_model.vlm_config.llm.name_or_path, cache_dir)
    rows = getattr(embeddings, "ds_shape", embeddings.shape)[0]  # DeepSpeed ZeRO-3: the live tensor is a shard
    if base_vocab != rows:
        state["model.embed_tokens.weight"] = ("model.embed_tokens.weight", embeddings)
        output = vlm_model.get_output_embeddings()
        if output is not None and output.weight is not embeddings:
            state["lm_head.weight"] = ("lm_head.weight", output.weight)
    # Tied tensors are stored once; loading ties them again.
    unique: dict[int, str] = {}
    out = {}
    for key, (name, tensor) in state.items():
        if id(tensor) not in unique:
            unique[id(tensor)] = key
            value = tensor if state_dict is None else state_dict[f"base_model.model.{name}"]
            out[key] = value.detach().contiguous().cpu()
    return out


def save_lora_run(model, folder: str | os.PathLike, *, tokenizer=None, image_processor=None,
                  cache_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a LoRA run folder: PEFT adapter, non-LoRA trainables, config.json, tokenizer and processor files
    (`cache_dir`: the Hugging Face hub cache the base LLM's config is read from). `state_dict`: the PeftModel's
    state dict the adapter and non-LoRA tensors are taken from (see `non_lora_state`); default the live model."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_lora_run expects the PeftModel returned by apply_lora, got {type(model).__name__}")
    from vlm.folders.weights import live_config

    vlm_model = model.get_base_model()
    config = vlm_model.vlm_config
    os.makedirs(folder, exist_ok=True)
    for adapter_config in model.peft_config.values():  # the base apply_lora recorded (a run reloaded keeps it)
        adapter_config.base_model_name_or_path = adapter_config.base_model_name_or_path or config.llm.name_or_path
    # Embeddings are handled by non_lora_trainables; "auto" would look the base up on the Hub.
    model.save_pretrained(str(folder), state_dict=state_dict, save_embedding_layers=False)
    non_lora = non_lora_state(model, cache_dir=cache_dir, state_dict=state_dict)
    save_file(non_lora, os.path.join(folder, NON_LORA_NAME), metadata={"format": "pt"})
    # The run describes the full-precision architecture (merge-lora rebuilds it); a quantised LLM's recipe
    # is kept beside it, so loading the run quantised again gives the model it was trained as.
    llm_config = vlm_model.config.to_dict()
    quantization = llm_config.pop("quantization_config", None)
    if quantization is not None:
        from vlm.quantization import save_quantization_record

        save_quantization_record(folder, quantization)
    live_config(vlm_model, llm_config=llm_config).save(folder)
    fingerprint = base_fingerprint(model, saved=set(non_lora))
    if fingerprint is not None:
        fingerprint["base"] = next(iter(model.peft_config.values())).base_model_name_or_path
        with open(os.path.join(folder, BASE_FINGERPRINT_NAME), "w", encoding="utf-8") as f:
            json.dump(fingerprint, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# The base a run was trained on


def _tensor_record(tensor: torch.Tensor) -> dict[str, Any]:
    t = tensor.detach().cpu().contiguous()
    count = min(_FINGERPRINT_SAMPLE, t.numel())
    index = torch.arange(count, dtype=torch.int64) * (t.numel() - 1) // max(count - 1, 1)  # exact for any size
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
            "sample": t.reshape(-1)[index].float().tolist()}


def base_fingerprint(model, *, saved: set[str] | None = None) -> dict[str, Any] | None:
    """What identifies the base weights of a LoRA `PeftModel`: a few frozen LLM tensors the run does not save
    (first, middle and last in model order, 2-D ones preferred), each with its sha256 and a sample of values.
    Quantised (integer) and partitioned (empty) tensors are skipped; None when nothing is left."""
    saved = set(non_lora_state(model)) if saved is None else saved  # the run's own tensors are not the base's
    candidates = []
    for name, p in model.get_base_model().named_parameters():
        plain = _plain_name(name)
        if ("lora_" in name or name.startswith(_NOT_LLM) or plain in saved or p.requires_grad
                or not p.dtype.is_floating_point or p.numel() == 0):
            continue
        candidates.append((plain, p))
    preferred = [c for c in candidates if c[1].dim() == 2] or candidates
    if not preferred:
        return None
    n = len(preferred)
    picks = sorted({round(i * (n - 1) / max(_FINGERPRINT_TENSORS - 1, 1)) for i in range(_FINGERPRINT_TENSORS)})
    return {"tensors": {preferred[i][0]: _tensor_record(preferred[i][1]) for i in picks}}


def _same_tensor(record: dict[str, Any], tensor: torch.Tensor) -> bool:
    """Bitwise equal in the recorded dtype; a base loaded in another dtype (e.g. a bfloat16 run merged in float32)
    is compared on the sampled values, within that lower precision's rounding."""
    if list(tensor.shape) != record["shape"]:
        return False
    dtype = getattr(torch, record["dtype"], None)
    if dtype is not None and _tensor_record(tensor.to(dtype))["sha256"] == record["sha256"]:
        return True
    if dtype is None or dtype == tensor.dtype:
        return False
    ours = torch.tensor(_tensor_record(tensor)["sample"])
    theirs = torch.tensor(record["sample"])
    return bool(torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * float(theirs.abs().max())))


def check_base_fingerprint(run: str, state: dict[str, torch.Tensor], base: str, *, force: bool = False) -> None:
    """FolderError naming the run's recorded base and `base` when `state` (the base's weights, vlm key layout)
    is not the base the run was trained on (`base_fingerprint.json`); a printed note instead when `force`.
    Runs saved before fingerprints existed are not checked."""
    from vlm.folders.weights import as_tensor

    path = os.path.join(run, BASE_FINGERPRINT_NAME)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    differ = [name for name, tensor_record in record["tensors"].items()
              if name in state and not _same_tensor(tensor_record, as_tensor(state[name]))]
    if not differ:
        return
    trained_on = record.get("base") or "(unrecorded)"
    message = (f"the LoRA run {run!r} was trained on base {trained_on!r}, but the weights of base {base!r} differ "
               f"({differ[0]} has another sha256 than {BASE_FINGERPRINT_NAME} records)")
    if force:
        print(f"note: {message}; merging anyway (--force-base)", file=sys.stderr, flush=True)
        return
    raise FolderError(f"{message}; pass the base it was trained on with --model-base, or --force-base to use this one")


# ---------------------------------------------------------------------------------------------------------
# Loading and merging


def _check_base_matches(run_llm: dict[str, Any], base_llm: dict[str, Any], run: str, base: str) -> None:
    for key in BASE_FIELDS:
        if key in run_llm and key in base_llm and run_llm[key] != base_llm[key]:
            raise FolderError(
                f"the LoRA run {run!r} does not fit the model base {base!r}: the run's LLM has {key}="
                f"{run_llm[key]!r}, the base's has {key}={base_llm[key]!r}; pass the base the run was trained "
                "from with --model-base"
            )
    if base_llm.get("vocab_size", 0) > run_llm.get("vocab_size", 0):
        raise FolderError(
            f"the LoRA run {run!r} does not fit the model base {base!r}: the base has a vocabulary of "
            f"{base_llm['vocab_size']} tokens, more than the run's {run_llm['vocab_size']}; pass the base the run "
            "was trained from with --model-base"
        )


def _base_state(config, model_base: str | None, run: str, dtype: torch.dtype | None,
                cache_dir: str | None = None, trust_remote_code: bool = False) -> tuple[dict, str, str]:
    """Weights of the base (vlm key layout), the name it was loaded from (a Hub id read through `cache_dir`), and
    the file(s) they came from (named in errors). A LLaVA-1.5, llava-hf folder or LoRA run is converted (merged)
    to a vlm model first, through the loaders of its kind."""
    from vlm.folders.kinds import check_folder_files, load_tokenizer, model_kind
    from vlm.folders.weights import check_weight_index, lazy_state_dict, weights_file
    from vlm.hub import check_remote_code

    base = model_base or recorded_base(run) or config.llm.name_or_path
    if not base:
        raise ConfigError(
            f"the LoRA run {run!r} records no base LLM (llm.name_or_path is empty); pass --model-base "
            "(a vlm model folder, an LLM folder or a hub id)"
        )
    kind, where = model_kind(base, cache_dir=cache_dir)
    if os.path.isdir(where):
        check_remote_code(where, trust_remote_code)
        check_weight_index(where)
    if kind == "vlm":
        from vlm.folders.build import read_folder_config

        _check_base_matches(config.llm.hf_config, read_folder_config(where).llm.hf_config, run, base)
        return lazy_state_dict(where), base, weights_file(where)  # read one tensor at a time by build_and_load
    if kind in ("llava", "llava-hf", "lora"):
        check_folder_files(where, kind)
        if kind == "llava":
            from vlm.folders.llava_original import load_llava_original

            base_model = load_llava_original(where, load_tokenizer(where, trust_remote_code=trust_remote_code),
                                             dtype=dtype, cache_dir=cache_dir)
        elif kind == "llava-hf":
            from vlm.folders.llava_hf import load_llava_hf

            base_model = load_llava_hf(where, dtype=dtype)
        else:
            base_model = merge_lora(load_lora_run(where, dtype=dtype, cache_dir=cache_dir,
                                                  trust_remote_code=trust_remote_code))
        _check_base_matches(config.llm.hf_config, base_model.vlm_config.llm.hf_config, run, base)
        return base_model.state_dict(), base, f"the {kind} base {where!r}"
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        base_hf = AutoConfig.from_pretrained(base, cache_dir=cache_dir,
                                             trust_remote_code=trust_remote_code).get_text_config()
    except OSError as exc:
        raise MissingPathError(f"cannot read the model base {base!r} of LoRA run {run!r}: {exc}") from None
    _check_base_matches(config.llm.hf_config, base_hf.to_dict(), run, base)
    llm = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, cache_dir=cache_dir,
                                               trust_remote_code=trust_remote_code)
    return llm.state_dict(), base, f"the LLM base {base!r}"


def recorded_base(run: str | os.PathLike) -> str | None:
    """The base a LoRA run records (`adapter_config.json`'s `base_model_name_or_path`), or None."""
    path = os.path.join(run, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("base_model_name_or_path") or None


def _check_run_files(folder: str) -> None:
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, NON_LORA_NAME, "config.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise MissingPathError(f"LoRA run folder {folder!r} has no {name}; it must be written by "
                                   "vlm.folders.lora.save_lora_run")


def check_adapter_fits(peft_model, saved: dict[str, torch.Tensor], path: str, *, hint: str = "") -> None:
    """FolderError naming `path` and the keys unless `saved` holds exactly the adapter tensors of `peft_model`
    (same targets, rank and bias mode), every shape equal."""
    from peft.utils import get_peft_model_state_dict

    from vlm.folders.weights import check_state_fits

    check_state_fits(saved, get_peft_model_state_dict(peft_model, save_embedding_layers=False), source=path, hint=hint)


def load_lora_run(folder: str | os.PathLike, model_base: str | None = None, *,
                  dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                  quantization=None, cache_dir: str | None = None, trust_remote_code: bool = False,
                  force_base: bool = False, attn_implementation: str | None = None):
    """Rebuild a LoRA run as a `PeftModel` (adapters unmerged), in eval mode.

    Args:
        folder: the run folder written by `save_lora_run`.
        model_base: a vlm model folder, a LLaVA-1.5 or llava-hf folder, an LLM folder or hub id; None uses the
            base the run records (see `recorded_base`), else its `llm.name_or_path`.
        dtype: overrides the run's dtype; device: where to put the model.
        quantization: a `BitsAndBytesConfig`: the base LLM is quantised (after the full-precision base and
            the non-LoRA trainables are loaded) and the adapters sit on top unmerged, as in QLoRA training.
        cache_dir: the Hugging Face hub cache a Hub-id base is read from (None: the default cache).
        trust_remote_code: let a base folder with `auto_map` run its code (refused otherwise).
        force_base: accept a base whose weights differ from the fingerprint the run recorded (a note is printed).

    Raises:
        MissingPathError: run files missing, base not there.
        FolderError: the base does not match the run (dimensions, vocabulary, fingerprint of its weights), or
            weights do not fit (the one strict path, `vlm.folders.build.build_and_load`).
    """
    from peft import PeftModel

    from vlm.folders.build import build_and_load, read_folder_config
    from vlm.model import dtype_name, resolve_dtype

    folder = str(folder)
    _check_run_files(folder)
    config = read_folder_config(folder)
    if dtype is not None:
        config = config.replace(dtype=dtype_name(dtype))
    state, base, base_source = _base_state(config, model_base, folder, resolve_dtype(config.dtype), cache_dir,
                                           trust_remote_code)
    check_base_fingerprint(folder, state, base, force=force_base)
    non_lora_path = os.path.join(folder, NON_LORA_NAME)
    non_lora = read_safetensors(non_lora_path)

    source = f"{base_source} + {non_lora_path}"

    def adapt(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        from vlm.folders.weights import check_state_fits

        expected = model.state_dict()
        # The run saves its projector and tower whole: one missing there must not be filled in from the base
        own = {name: p for name, p in model.named_parameters() if name.startswith(_NOT_LLM)}
        check_state_fits({k: v for k, v in non_lora.items() if k in own}, own, source=source)
        tied = config.llm.hf_config.get("tie_word_embeddings", False)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):  # the base's smaller vocabulary: the run's rows
            if key in state and key in expected and state[key].shape[0] < expected[key].shape[0]:
                if key not in non_lora and not (key == "lm_head.weight" and tied):
                    raise FolderError(
                        f"the LoRA run {folder!r} has a vocabulary of {expected[key].shape[0]} but its base {base!r} "
                        f"has {state[key].shape[0]}, and {non_lora_path} lacks {key}; the run is incomplete"
                    )
                state.pop(key)
        return {**state, **non_lora}

    model = build_and_load(config, state, source=source, adapt_state=adapt,
                           attn_implementation=attn_implementation,
                           config_source=os.path.join(folder, "config.json"))
    if quantization is not None:
        from vlm.quantization import quantize_llm

        model = quantize_llm(model, quantization, device=device or "cpu")

    adapter_path = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    saved = read_safetensors(adapter_path)
    check_adapter_rank(folder, saved)  # else peft fails with a page of "size mismatch" lines
    peft_model = PeftModel.from_pretrained(model, folder)
    check_adapter_fits(peft_model, saved, adapter_path)
    if device is not None and quantization is None:  # a quantised LLM is placed when it is loaded
        peft_model = peft_model.to(device)
    return peft_model.eval()


def check_adapter_rank(folder: str | os.PathLike, saved: dict[str, torch.Tensor]) -> None:
    """FolderError naming both files when `adapter_config.json`'s rank `r` (or its `rank_pattern`) disagrees with
    the rank of the `lora_A` matrices in the adapter weights (files of two different runs)."""
    from vlm.config import read_json_object

    path = os.path.join(folder, ADAPTER_CONFIG_NAME)
    config = read_json_object(path)
    r, pattern = config.get("r"), config.get("rank_pattern") or {}
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise FolderError(f"{path}: r={r!r} must be a positive integer (the LoRA rank)")
    allowed = {r, *(v for v in pattern.values() if isinstance(v, int))} if isinstance(pattern, dict) else {r}
    for key, tensor in saved.items():
        if key.endswith("lora_A.weight") and tensor.shape[0] not in allowed:
            raise FolderError(
                f"{path} says r={r} but {ADAPTER_WEIGHTS_NAME} holds rank-{tensor.shape[0]} adapters ({key}: "
                f"{tuple(tensor.shape)}); the two files come from different runs: restore the run's "
                f"{ADAPTER_CONFIG_NAME} (r={tensor.shape[0]})"
            )


def merge_lora(model):
    """Fold the adapters of a `PeftModel` into its weights (W + alpha/r * B @ A); returns the plain VLM."""
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


def merge_lora_run(folder: str | os.PathLike, output: str | os.PathLike, model_base: str | None = None, *,
                   dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
                   force_base: bool = False):
    """Load a LoRA run, merge it and write a vlm model folder (weights, config, tokenizer, processor) to `output`.

    The adapters are merged onto the full-precision base, also for runs trained on a quantised LLM (QLoRA):
    W + alpha/r * B @ A with W the base's own weights, not their 4-/8-bit approximation.
    """
    from vlm.folders.kinds import TOKENIZER_FILES, load_image_processor, load_tokenizer
    from vlm.folders.weights import save_model_folder
    from vlm.visual.processor import PREPROCESSOR_CONFIG_NAME

    merged = merge_lora(load_lora_run(folder, model_base, dtype=dtype, trust_remote_code=trust_remote_code,
                                      force_base=force_base))
    has_tokenizer = any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES)
    tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code) if has_tokenizer else None
    has_processor = os.path.isfile(os.path.join(folder, PREPROCESSOR_CONFIG_NAME))
    processor = load_image_processor(str(folder), merged) if has_processor else None
    save_model_folder(output, merged, tokenizer=tokenizer, image_processor=processor)
    return merged


def load_lora_checkpoint(peft_model, folder: str | os.PathLike, *, cache_dir: str | None = None) -> None:
    """Restore a LoRA run (a training checkpoint: resume) into the live PEFT model: adapter weights and the
    non-LoRA trainables.

    Strict both ways, through the LoRA run format's own checks: the adapter file must hold exactly the model's
    adapter tensors, and `non_lora_trainables.safetensors` exactly what `save_lora_run` writes for this model (its
    keys use the plain layout, `q_proj.bias` for PEFT's `q_proj.base_layer.bias`), every shape equal; otherwise a
    FolderError names the file and the missing, unexpected or mis-shaped keys. `cache_dir`: the Hugging Face hub
    cache the run was saved with (`--cache_dir`), so the expected tensors are the saved ones.
    """
    from peft.utils import set_peft_model_state_dict

    from vlm.folders.weights import check_state_fits

    folder = str(folder)
    hint = "; resume with the flags the run was started with"
    adapter_path, non_lora_path = os.path.join(folder, ADAPTER_WEIGHTS_NAME), os.path.join(folder, NON_LORA_NAME)
    for path in (adapter_path, non_lora_path):
        if not os.path.isfile(path):
            raise MissingPathError(f"LoRA checkpoint {folder!r} has no {os.path.basename(path)}; resume from a "
                                   "checkpoint of this LoRA run")
    adapter = read_safetensors(adapter_path)
    check_adapter_fits(peft_model, adapter, adapter_path, hint=hint)
    state = read_safetensors(non_lora_path)
    check_state_fits(state, non_lora_state(peft_model, cache_dir=cache_dir), source=non_lora_path, hint=hint)
    set_peft_model_state_dict(peft_model, adapter)
    params = {_plain_name(name): p for name, p in peft_model.get_base_model().named_parameters()}
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)
