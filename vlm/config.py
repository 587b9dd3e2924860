"""Configuration of a VLM: one dataclass per component, nested in `VLMConfig`, saved as `config.json`.

Design choices:
- Each component keeps both where it came from (`name_or_path`: a hub id or a folder) and the full
  `transformers` config it was built with (`hf_config`, a plain dict). A saved model folder is then
  rebuilt from `config.json` alone, offline, whatever the original source was.
- Built and validated once, then read-only: every dataclass is frozen (assignment raises
  `dataclasses.FrozenInstanceError`). A changed copy is `config.replace(field=value)` (or
  `dataclasses.replace`), which validates again. Derived values (`num_image_tokens`, projector dimensions,
  the sub-models' `hf_config`) are filled in by the model builder, which returns the completed copy as
  `model.vlm_config`.
- Everything that defines how to run the model is here and in `config.json`: the components, the image
  token, and the chat template the model was trained with (`template`; folders written before it existed
  record it in `vlm_generation.json`, read by `vlm.folders.kinds.folder_template`), and the image aspect
  mode training used (`image_aspect_ratio`), which loaders give the image processor.
- The nested dataclasses serialise to plain JSON with `to_dict`/`from_dict`; unknown keys are an
  error, so a typo in a hand-written config does not pass silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from vlm.errors import ConfigError, FolderError, MissingPathError

CONFIG_NAME = "config.json"
WRITER_VERSION_KEY = "transformers_version"  # in config.json, not a VLMConfig field
SELECT_FEATURES = ("patch", "cls_patch")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "torch_varlen")
DTYPES = ("float32", "bfloat16", "float16")
# an optional token-reducing k x k merge (`pixel_shuffle2_`, `avgpool2_`; vlm.projector.merge), then the projector
_PROJECTOR_TYPE = re.compile(r"^(?:(?P<merge>pixel_shuffle|avgpool)(?P<factor>\d+)_)?"
                             r"(?P<base>linear|identity|mlp(?P<depth>\d+)x_gelu)$")


# Sizes past these are typos or hostile files, not models: checked before anything is allocated (a 400M
# vocabulary would ask for 102 GB at once). The largest real ones are far inside (vocabularies ~260k,
# hidden 16k, towers of 1,024 px and 4,096 patches).
SIZE_BOUNDS = {
    "llm": {"vocab_size": 2**24, "hidden_size": 65_536, "intermediate_size": 262_144, "num_hidden_layers": 1_024},
    "vision": {"hidden_size": 65_536, "intermediate_size": 262_144, "num_hidden_layers": 1_024,
               "image_size": 8_192},
}
MAX_PATCHES = 65_536  # the tower's position table has one row per patch


def _type_name(kind: Any) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", dict: "an object"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def check_field_types(obj: Any, where: str) -> None:
    """ConfigError naming `where.field` when a field's value is not of its annotated type (JSON gives any type:
    `"image_token_id": "5"`, `"select_layer": "abc"`); bool is not accepted for an int."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None and type(None) in args:
            continue
        kinds = [typing.get_origin(a) or a for a in args if a is not type(None)]
        if any(k is Any or dataclasses.is_dataclass(k) for k in kinds):
            continue
        if any(isinstance(value, k) and not (k is int and isinstance(value, bool)) for k in kinds):
            continue
        expected = " or ".join(_type_name(k) for k in kinds) + (" or null" if type(None) in args else "")
        raise ConfigError(f"{where}{f.name}={value!r} ({type(value).__name__}) must be {expected}")


def _check_size_bounds(hf_config: dict[str, Any] | None, section: str) -> None:
    if not hf_config:
        return
    config = hf_config.get("vision_config", hf_config) if section == "vision" else hf_config
    for key, limit in SIZE_BOUNDS[section].items():
        value = config.get(key) if isinstance(config, dict) else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise ConfigError(f"{section}.hf_config.{key}={value!r} is not a size a model can have (expected an "
                              f"integer in 1..{limit:,}); fix the config")
    if section == "vision" and isinstance(config, dict):
        size, patch = config.get("image_size"), config.get("patch_size")
        if isinstance(size, int) and isinstance(patch, int) and patch > 0 and (size // patch) ** 2 > MAX_PATCHES:
            raise ConfigError(f"vision.hf_config image_size={size} with patch_size={patch} makes {(size // patch) ** 2:,} "
                              f"patches per image (at most {MAX_PATCHES:,}); fix the config")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {json.dumps(data)[:40]} ({type(data).__name__})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower: a CLIP or SigLIP vision model from `transformers`.

    `select_layer` indexes the tower's `hidden_states` (LLaVA's `mm_vision_select_layer`; -2 is the
    penultimate layer's output). `select_feature="patch"` drops the CLS token where the tower has one
    (CLIP) and keeps every token where it has none (SigLIP); `"cls_patch"` keeps them all.
    """

    name_or_path: str | None = None
    hf_config: dict[str, Any] | None = None
    select_layer: int = -2
    select_feature: str = "patch"
    frozen: bool = True

    def validate(self) -> None:
        check_field_types(self, "vision.")
        _check_size_bounds(self.hf_config, "vision")
        if self.name_or_path is None and self.hf_config is None:
            raise ConfigError("vision: set `name_or_path` (hub id or folder) or `hf_config` (a vision config dict)")
        if self.select_feature not in SELECT_FEATURES:
            raise ConfigError(f"vision.select_feature={self.select_feature!r}; expected one of {SELECT_FEATURES}")


@dataclass(frozen=True)
class ProjectorConfig:
    """The projector from vision features to the LLM's embedding space (LLaVA's `mm_projector_type`).

    `linear`, `identity`, or `mlp{N}x_gelu` (N linear layers with GELU between them; `mlp2x_gelu` is
    LLaVA-1.5's). Token-reducing (opt-in): `pixel_shuffle{k}_` or `avgpool{k}_` before `linear`/`mlp{N}x_gelu`
    (e.g. `pixel_shuffle2_mlp2x_gelu`) merges each k x k block of patches first, k*k times fewer image tokens
    (`vlm.projector.merge`). `input_dim`/`output_dim` are filled in from the vision tower and the LLM.
    """

    type: str = "mlp2x_gelu"
    input_dim: int | None = None
    output_dim: int | None = None

    @property
    def merge(self) -> str | None:
        """'pixel_shuffle' or 'avgpool' for a token-reducing projector, else None."""
        match = _PROJECTOR_TYPE.match(self.type)
        return match["merge"] if match else None

    @property
    def merge_factor(self) -> int:
        """k of a k x k merge (1: none): the image tokens are the patches / k**2."""
        match = _PROJECTOR_TYPE.match(self.type)
        return int(match["factor"]) if match and match["factor"] else 1

    def validate(self) -> None:
        check_field_types(self, "projector.")
        match = _PROJECTOR_TYPE.match(self.type)
        if match is None:
            raise ConfigError(
                f"projector.type={self.type!r} is not supported; expected 'linear', 'identity' or 'mlp<N>x_gelu', "
                "optionally after a token-reducing 'pixel_shuffle<k>_' or 'avgpool<k>_' "
                "(e.g. 'pixel_shuffle2_mlp2x_gelu')"
            )
        if match["depth"] is not None and int(match["depth"]) < 1:
            raise ConfigError(f"projector.type={self.type!r}: an MLP needs at least one layer")
        if match["merge"] is not None:
            if int(match["factor"]) < 2:
                raise ConfigError(f"projector.type={self.type!r}: a merge needs blocks of at least 2x2 patches")
            if match["base"] == "identity":
                raise ConfigError(f"projector.type={self.type!r}: a merge must be followed by 'linear' or "
                                  "'mlp<N>x_gelu' (identity cannot map the merged features to the LLM's width)")
        if self.type == "identity" and None not in (self.input_dim, self.output_dim):
            if self.input_dim != self.output_dim:
                raise ConfigError(
                    f"projector.type='identity' needs equal dimensions, got vision {self.input_dim} "
                    f"and LLM {self.output_dim}; use 'linear' or 'mlp2x_gelu'"
                )


@dataclass(frozen=True)
class LLMConfig:
    """The decoder LLM; its class is chosen from `hf_config["model_type"]` (see `vlm.llm.registry`)."""

    name_or_path: str | None = None
    hf_config: dict[str, Any] | None = None

    def validate(self) -> None:
        check_field_types(self, "llm.")
        _check_size_bounds(self.hf_config, "llm")
        if self.name_or_path is None and self.hf_config is None:
            raise ConfigError("llm: set `name_or_path` (hub id or folder) or `hf_config` (a decoder config dict)")


@dataclass(frozen=True)
class VLMConfig:
    """The whole model: components, the image token, the chat template and run-time settings.

    `template`: the name of the chat template the model was trained with (`vlm.data.templates`), what
    every prompt for it must use; None when unknown (a model not trained by vlm, a fresh build).
    `image_aspect_ratio`: how images were fitted to the tower in training ("pad", "resize", "crop"; LLaVA's
    `--image_aspect_ratio`); loaders give the image processor this mode. None: the processor's own.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_token_id: int | None = None
    num_image_tokens: int | None = None
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    template: str | None = None
    image_aspect_ratio: str | None = None
    format_version: int = 1

    def validate(self) -> None:
        check_field_types(self, "")
        self.vision.validate()
        self.projector.validate()
        self.llm.validate()
        if self.projector.merge is not None and self.vision.select_feature == "cls_patch":
            raise ConfigError(f"projector.type={self.projector.type!r} merges the patch grid and cannot take "
                              "vision.select_feature='cls_patch' (the CLS token is no patch); use 'patch'")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"attn_implementation={self.attn_implementation!r}; expected one of {ATTN_IMPLEMENTATIONS}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; expected one of {DTYPES}")
        if self.image_token_id is not None and self.image_token_id < 0:
            raise ConfigError(f"image_token_id={self.image_token_id} must be a non-negative token id")
        if self.template is not None:
            from vlm.data.templates import ALIASES, TEMPLATES

            if self.template not in TEMPLATES and self.template not in ALIASES:
                raise ConfigError(f"template={self.template!r} is not a chat template; valid names: "
                                  f"{', '.join(sorted(set(TEMPLATES) | set(ALIASES)))}")
        if self.image_aspect_ratio is not None:
            from vlm.visual.processor import ASPECT_RATIOS

            if self.image_aspect_ratio not in ASPECT_RATIOS:
                raise ConfigError(f"image_aspect_ratio={self.image_aspect_ratio!r} is not supported; choose one of "
                                  f"{', '.join(ASPECT_RATIOS)}")

    def __post_init__(self) -> None:
        self.validate()

    def replace(self, **changes: Any) -> "VLMConfig":
        """A validated copy with `changes` (this config is read-only): `config.replace(template="chatml")`."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLMConfig":
        data = dict(data)
        data.pop(WRITER_VERSION_KEY, None)  # written by `save`, informational
        parts = {
            "vision": _from_dict(VisionConfig, data.pop("vision", {}), "config 'vision'"),
            "projector": _from_dict(ProjectorConfig, data.pop("projector", {}), "config 'projector'"),
            "llm": _from_dict(LLMConfig, data.pop("llm", {}), "config 'llm'"),
        }
        return _from_dict(cls, {**data, **parts}, "config")

    def save(self, folder: str | os.PathLike) -> None:
        """Write `config.json`, with the `transformers_version` that wrote it as transformers' configs do.

        transformers reads that key too: `AutoTokenizer.from_pretrained(folder)` of a large (>100k)
        tokenizer opens the folder's config.json, and one with neither a `model_type` nor a
        `transformers_version` >= 5 is taken for a Mistral tokenizer saved by transformers 4, with an
        "incorrect regex pattern ... fix_mistral_regex=True" warning
        (`TokenizersBackend._patch_mistral_regex`). Recording the version is true and avoids that.
        """
        import transformers

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump({**self.to_dict(), WRITER_VERSION_KEY: transformers.__version__}, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "VLMConfig":
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise MissingPathError(f"no {CONFIG_NAME} in model folder {str(folder)!r}")
        data = read_json_object(path)
        lacking = [section for section in ("vision", "llm") if section not in data]
        if lacking:
            raise FolderError(
                f"{path} is not a complete vlm model config (no {' or '.join(repr(s) for s in lacking)} section); "
                "restore it from the run that saved the model; for LLaVA or llava-hf folders use "
                "vlm.load_pretrained_model, which converts them"
            )
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding one object; ConfigError naming the file (and the line) when it is not valid UTF-8
    JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                          "fix or replace the file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); it is not a JSON config") from None
    except RecursionError:
        raise ConfigError(f"{path} nests too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data
