"""Guards for what only a probe showed: transformers' reading of our config.json, strict LoRA resume.

(Qwen3/Mistral parity and the identity projector are in test_model.py, the LoRA SIGKILL resume in
test_train.py, next to the tests they extend.)
"""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import vlm
from vlm.folders.weights import save_model_folder
from vlm.config import VLMConfig
from vlm.folders.lora import NON_LORA_NAME, apply_lora, save_lora_run
from vlm.tiny import tiny_vlm_config
from vlm.folders.lora import load_lora_checkpoint

# transformers only looks for the Mistral regex problem in tokenizers with more than 100,000 entries
# (TokenizersBackend.__init__), as Qwen2.5's (151k) and Llama-3's (128k) are.
LARGE_VOCAB = 100_100


def large_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, **{f"t{i}": i + 2 for i in range(LARGE_VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def tokenizer_log(folder) -> str:
    """What transformers logs while `AutoTokenizer.from_pretrained(folder)` runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = hf_logging.get_logger()  # the "transformers" root logger; it does not propagate
    logger.addHandler(handler)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    finally:
        logger.removeHandler(handler)
    assert len(tokenizer) > 100_000  # large enough for transformers to run the check at all
    return stream.getvalue()


def test_model_folder_tokenizer_loads_without_the_mistral_regex_warning(tmp_path):
    tokenizer = large_tokenizer()
    torch.manual_seed(0)
    model = vlm.build_model(tiny_vlm_config("siglip", "qwen2", vocab_size=len(tokenizer)))
    folder = tmp_path / "model"
    save_model_folder(folder, model, tokenizer=tokenizer)
    written = json.loads((folder / "config.json").read_text())
    import transformers

    assert written.pop("transformers_version") == transformers.__version__
    assert json.loads(json.dumps(VLMConfig.load(folder).to_dict())) == written  # read back, not kept as a field

    log = tokenizer_log(folder)
    assert "fix_mistral_regex" not in log and "incorrect regex pattern" not in log, log

    # The capture works and the cause is the one named: the same folder, config.json without the key.
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "config.json").write_text(json.dumps(written))
    assert "fix_mistral_regex" in tokenizer_log(old)


def lora_model(seed: int):
    torch.manual_seed(seed)
    model = vlm.build_model(tiny_vlm_config("clip", "qwen2"))
    return apply_lora(model, r=4, alpha=8, dropout=0.0, bias="lora_only")


def test_lora_checkpoint_restores_every_trainable_and_names_missing_keys(tmp_path):
    """Adapter, LoRA-trained biases (PEFT's `base_layer.bias`, saved as `bias`) and projector come back
    exactly; a file that lacks a key or has one too many is refused with the key named."""
    trained = lora_model(seed=0)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # move every trainable away from its initial value
    save_lora_run(trained, tmp_path / "ckpt")
    fresh = lora_model(seed=1)
    load_lora_checkpoint(fresh, str(tmp_path / "ckpt"))
    want = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    got = dict(fresh.named_parameters())
    assert any(n.endswith("base_layer.bias") for n in want) and any("mm_projector" in n for n in want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name

    path = tmp_path / "ckpt" / NON_LORA_NAME
    state = load_file(path)
    missing = sorted(k for k in state if k.startswith("mm_projector."))[0]
    save_file({k: v for k, v in state.items() if k != missing}, path)
    with pytest.raises(ValueError, match=rf"{NON_LORA_NAME} .* 1 missing key\(s\) \[{missing}\]"):
        load_lora_checkpoint(lora_model(seed=1), str(tmp_path / "ckpt"))
    save_file({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\) \[extra.weight\].*flags the run was started"):
        load_lora_checkpoint(lora_model(seed=1), str(tmp_path / "ckpt"))
