"""llava-hf folders (`transformers`' `LlavaForConditionalGeneration`, what vLLM and SGLang serve): in and out.

Design choices:
- The config is read with `transformers`' own `LlavaConfig`, so defaults a `config.json` leaves out are
  the ones `transformers` would use. Keys are renamed with the tables of `vlm.folders.keymap`; loading is
  strict (every key consumed, every shape checked).
- Feature selection: llava-hf's `vision_feature_select_strategy="default"` drops the first token (CLIP's
  CLS) = our `patch` on CLIP; `"full"` keeps every token = our `cls_patch` on CLIP and `patch` on SigLIP
  (which has no CLS). `default` on SigLIP drops a real patch; no vlm model does that, so it is refused.
- Export writes what `from_pretrained` and `AutoProcessor` need and nothing that cannot be expressed:
  only the `mlp2x_gelu` projector (linear_1, GELU, linear_2, with biases) exists there, one integer
  `vision_feature_layer` (always written negative: transformers reads 0 as "no hidden states"), CLIP/SigLIP
  towers. The processor is a `LlavaProcessor` whose `patch_size`,
  `num_additional_image_tokens` and strategy make it expand `<image>` to exactly `num_image_tokens`,
  whose image processor reproduces ours (`pad` -> LlavaImageProcessor `do_pad`, which fills with
  int(mean*255) as we do: identical pixels), and whose
  chat template renders our conversation template. `generation_config.json` stops on the template's
  end-of-turn token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from vlm.errors import ConfigError
from vlm.folders.keymap import LLAVA_HF_TO_VLM, VLM_TO_LLAVA_HF, rename_keys

IMAGE_TOKEN = "<image>"
_HF_PROCESSOR_BY_ASPECT = {"pad": "LlavaImageProcessor", "crop": "CLIPImageProcessor", "resize": "SiglipImageProcessor"}


def _has_cls(vision_model_type: str) -> bool:
    from vlm.visual.tower import _tower_entry

    return _tower_entry(vision_model_type)[2]


def vlm_config_from_llava_hf(folder: str | os.PathLike):
    """The VLMConfig equivalent to a llava-hf folder's `config.json`; ConfigError for what vlm cannot express."""
    from transformers import LlavaConfig

    from vlm.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig

    hf = LlavaConfig.from_pretrained(str(folder))
    where = f"{os.path.join(folder, 'config.json')}"
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError(f"{where}: vision_feature_layer={layer!r} (several layers concatenated) is not supported by vlm")
    if hf.projector_hidden_act != "gelu" or not getattr(hf, "multimodal_projector_bias", True):
        raise ConfigError(
            f"{where}: projector_hidden_act={hf.projector_hidden_act!r}, multimodal_projector_bias="
            f"{getattr(hf, 'multimodal_projector_bias', True)}; vlm's mlp2x_gelu needs 'gelu' with biases"
        )
    vision = hf.vision_config.to_dict()
    strategy = hf.vision_feature_select_strategy
    has_cls = _has_cls(vision["model_type"])
    if strategy == "default":
        if not has_cls:
            raise ConfigError(
                f"{where}: vision_feature_select_strategy='default' on a {vision['model_type']} tower (no CLS token) "
                "drops a real image patch; vlm does not support that (transformers itself fails on it)"
            )
        select_feature = "patch"
    elif strategy == "full":
        select_feature = "cls_patch" if has_cls else "patch"
    else:
        raise ConfigError(f"{where}: unknown vision_feature_select_strategy={strategy!r}")
    return VLMConfig(
        vision=VisionConfig(hf_config=vision, select_layer=layer, select_feature=select_feature),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=LLMConfig(hf_config=hf.text_config.to_dict()),
        image_token_id=hf.image_token_id,
        dtype=_dtype_of(hf),
    )


def _dtype_of(hf_config) -> str:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def load_llava_hf(folder: str | os.PathLike, *, dtype=None, attn_implementation: str | None = None):
    """A llava-hf folder as a vlm model (weights renamed, strict: `vlm.folders.build.build_and_load`)."""
    from vlm.folders.build import build_and_load
    from vlm.folders.weights import lazy_state_dict, weights_file

    config = vlm_config_from_llava_hf(folder)
    state = rename_keys(lazy_state_dict(folder), LLAVA_HF_TO_VLM, what=f"llava-hf checkpoint {str(folder)!r}")
    return build_and_load(config, state, source=weights_file(folder), dtype=dtype or config.dtype,
                          attn_implementation=attn_implementation, config_source=os.path.join(folder, "config.json"))


# ---------------------------------------------------------------------------------------------------------
# Export


def llava_hf_strategy(config) -> str:
    """The llava-hf `vision_feature_select_strategy` equal to our selection; ConfigError when there is none."""
    has_cls = _has_cls(config.vision.hf_config["model_type"])
    if config.projector.type != "mlp2x_gelu":
        raise ConfigError(
            f"cannot export to llava-hf: projector.type={config.projector.type!r}; LlavaForConditionalGeneration "
            "only has the mlp2x_gelu projector (linear_1, GELU, linear_2)"
        )
    return "full" if (config.vision.select_feature == "cls_patch" or not has_cls) else "default"


def llava_hf_feature_layer(config) -> int:
    """Our `vision.select_layer` as the negative `vision_feature_layer` that selects the same hidden state.

    transformers' LLaVA passes `vision_feature_layer` on as `output_hidden_states` (the layers to capture), so
    0 (the embeddings, hidden_states[0]; the demo model's choice) reads as False and no hidden states come back:
    `generate` fails with "'NoneType' object is not subscriptable". With L layers there are L + 1 hidden states,
    so layer k >= 0 is also -(L + 1 - k); every layer is written that way (-2 stays -2, LLaVA's default).
    """
    num_layers = config.vision.hf_config["num_hidden_layers"]
    layer = config.vision.select_layer
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ConfigError(f"cannot export: vision.select_layer={layer} is out of range for a tower with {num_layers} layers")
    return layer if layer < 0 else layer - (num_layers + 1)


def llava_hf_config(config):
    """The `LlavaConfig` of a vlm model's config."""
    from transformers import LlavaConfig

    from vlm.model import text_config_from_dict
    from vlm.visual.tower import vision_config_from_dict

    strategy = llava_hf_strategy(config)
    text = text_config_from_dict(config.llm.hf_config)
    return LlavaConfig(
        vision_config=vision_config_from_dict(config.vision.hf_config),
        text_config=text,
        image_token_index=config.image_token_id,
        image_seq_length=config.num_image_tokens,
        vision_feature_layer=llava_hf_feature_layer(config),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=text.tie_word_embeddings,
        dtype=config.dtype,
    )


def chat_template_jinja(template, tokenizer) -> str:
    """A Jinja chat template rendering messages exactly as `template` (a vlm.data Template) does.

    User content may be a string (with literal `<image>`) or a list of `{"type": "image"}` /
    `{"type": "text", "text": ...}` items; images render first, each as `<image>\\n`, as vlm prepends them.
    """
    if template.use_chat_template:
        return tokenizer.chat_template
    template = template.bind(tokenizer)

    def lit(text: str) -> str:
        return json.dumps(text)

    sys_prefix, sys_suffix = template.system_format.split("{content}") if template.system_format else ("", "")
    user_prefix, user_suffix = template.user_format.split("{content}")
    default_system = "none" if template.default_system is None else lit(template.default_system)
    content = (
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set ns.text = '' -%}"
        "{%- for item in message['content'] if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}{%- endfor -%}"
        "{%- for item in message['content'] if item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endfor -%}"
        "{%- set text = ns.text -%}{%- endif -%}"
    )
    if template.image_first:  # LLaVA-1.5: a message's single <image> moves to its start, then a newline
        content += ("{%- if message['role'] == 'user' and (text.split('<image>') | length) == 2 -%}"
                    "{%- set text = ('<image>\n' + (text.replace('<image>', '') | trim)) | trim -%}{%- endif -%}")
    user_text = "{{- text -}}" if template.user_text else "{{- '<image>' * (text.split('<image>') | length - 1) -}}"
    # the BOS the tokenizer adds itself (vicuna, plain) is spelled out: processors tokenise the rendering
    # without adding special tokens
    bos = template.bos + (tokenizer.bos_token if template.leading_ids(tokenizer) else "")
    return (
        "{%- set ns = namespace(text='') -%}"
        f"{{%- set system = {default_system} -%}}{{%- set start = 0 -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set message = messages[0] -%}" + content + "{%- set system = text -%}{%- set start = 1 -%}{%- endif -%}"
        f"{{{{- {lit(bos)} -}}}}"
        + (f"{{%- if system is not none -%}}{{{{- {lit(sys_prefix)} + system + {lit(sys_suffix)} -}}}}{{%- endif -%}}"
           if template.system_format else "")
        + "{%- for message in messages[start:] -%}" + content
        + "{%- if message['role'] == 'user' -%}"
        f"{{{{- {lit(user_prefix)} -}}}}" + user_text + f"{{{{- {lit(user_suffix + template.assistant_header)} -}}}}"
        "{%- else -%}"
        f"{{{{- {lit(template.reply_prefix)} + text + {lit(template.end_of_turn + template.turn_separator)} -}}}}"
        "{%- endif -%}{%- endfor -%}"
    )


def _hf_image_processor_dict(image_processor) -> dict[str, Any]:
    cfg = image_processor.config
    values = image_processor.to_hf_dict()
    values.pop("image_aspect_ratio", None)
    values["image_processor_type"] = _HF_PROCESSOR_BY_ASPECT[cfg.aspect_ratio]
    if cfg.aspect_ratio == "pad":
        values["do_pad"] = True
    return values


def export_llava_hf(model, folder: str | os.PathLike, *, tokenizer, image_processor, template: str) -> None:
    """Write `model` as a llava-hf folder (weights, config, generation config, LlavaProcessor files).

    Raises ConfigError for what the format cannot express (see `llava_hf_strategy`) and when the tokenizer's
    `<image>` id differs from the model's.
    """
    from transformers import AutoImageProcessor, GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlm.data.templates import get_template
    from vlm.data.tokenizer import get_image_token_id, token_id

    config = model.vlm_config
    hf_config = llava_hf_config(config)
    if get_image_token_id(tokenizer) != config.image_token_id:
        raise ConfigError(
            f"cannot export: the tokenizer's {IMAGE_TOKEN} id is {get_image_token_id(tokenizer)} but the model's "
            f"image_token_id is {config.image_token_id}; export with the tokenizer the model was trained with"
        )
    bound = get_template(template, tokenizer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(hf_config)
    state = rename_keys(model.state_dict(), VLM_TO_LLAVA_HF, what="vlm model")
    hf_model.load_state_dict(state, strict=True, assign=True)
    hf_model.tie_weights()
    eot = token_id(tokenizer, bound.end_of_turn_token(tokenizer))
    stops = [i for i in dict.fromkeys([eot, tokenizer.eos_token_id]) if i is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf_model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad,
                                                  bos_token_id=tokenizer.bos_token_id)
    hf_model.save_pretrained(folder)

    (folder / "preprocessor_config.json").write_text(json.dumps(_hf_image_processor_dict(image_processor), indent=2))
    hf_image_processor = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False)  # the file just written
    tower_config = hf_config.vision_config
    processor = LlavaProcessor(
        image_processor=hf_image_processor,
        tokenizer=tokenizer,
        patch_size=tower_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        chat_template=chat_template_jinja(bound, tokenizer),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(_has_cls(tower_config.model_type)),
    )
    processor.save_pretrained(str(folder))
