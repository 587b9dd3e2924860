"""LLaVA-1.5's data preprocessing, written from its published behaviour, as the reference for our templates.

Source: https://github.com/haotian-liu/LLaVA (v1.2.x), `llava/train/train.py` (`preprocess_multimodal`,
`preprocess_v1`, `preprocess_plain`), `llava/conversation.py` (`conv_vicuna_v1`, `conv_llava_plain`,
`SeparatorStyle.TWO`'s `get_prompt`), `llava/mm_utils.py` (`tokenizer_image_token`), and the eval prompt of
`llava/eval/model_vqa.py`. Rewritten here step for step (no code copied), including its quirks:
- each chunk between `<image>`s is tokenised on its own with the tokenizer's special tokens, and the BOS
  of every chunk after the first is dropped;
- labels are found by re-tokenising each round (`split("</s>")`, then `split(" ASSISTANT: ")`), with the
  "-2" and, for `legacy=False` tokenizers, the "-1" length corrections; when the counted length differs
  from the real one every label of the sample is masked ("tokenization mismatch").
Image positions carry IMAGE_TOKEN_INDEX (-200), as in LLaVA; callers expand them.
"""

from __future__ import annotations

IMAGE = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def preprocess_multimodal(turns: list[dict]) -> list[dict]:
    """Every turn holding `<image>`: the placeholder removed, the text stripped, `<image>\\n` put in front."""
    out = []
    for turn in turns:
        value = turn["value"]
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append({"from": turn["from"], "value": value})
    return out


def vicuna_v1_prompt(turns: list[dict], *, system: str = VICUNA_V1_SYSTEM, generation: bool = False) -> str:
    """`conv_vicuna_v1.get_prompt()` (SeparatorStyle.TWO, sep " ", sep2 "</s>"); `generation` appends
    "ASSISTANT:" as `append_message(roles[1], None)` does."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    text = system + seps[0]
    for i, turn in enumerate(turns):
        text += roles[turn["from"]] + ": " + turn["value"] + seps[i % 2]
    if generation:
        text += "ASSISTANT:"
    return text


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def preprocess_v1(turns: list[dict], tokenizer, *, has_image: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, mismatch) for one LLaVA conversation (`turns` already through preprocess_multimodal)."""
    conversation = vicuna_v1_prompt(turns)

    def tokenize(text: str) -> list[int]:
        return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids

    input_ids = tokenize(conversation)
    labels = list(input_ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, round_text in enumerate(conversation.split("</s>")):
        if round_text == "":
            break
        parts = round_text.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenize(round_text))
        instruction_len = len(tokenize(parts[0])) - 2
        if i != 0 and not getattr(tokenizer, "legacy", True):
            round_len -= 1
            instruction_len -= 1
        labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    mismatch = cur != len(input_ids)
    if mismatch:
        labels = [IGNORE_INDEX] * len(labels)
    return input_ids, labels, mismatch


def preprocess_plain(turns: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """LLaVA's stage-1 format: the human turn becomes just `<image>`, then the caption and sep "\\n"."""
    assert len(turns) == 2 and IMAGE in turns[0]["value"]
    conversation = IMAGE + turns[1]["value"] + "\n"
    input_ids = tokenizer_image_token(conversation, tokenizer)
    masked = len(tokenizer_image_token(IMAGE, tokenizer))
    labels = [IGNORE_INDEX] * masked + input_ids[masked:]
    return input_ids, labels


def eval_prompt(question: str, tokenizer) -> list[int]:
    """LLaVA-1.5's `model_vqa` prompt: `<image>\\n` + question, conv_mode vicuna_v1, up to "ASSISTANT:"."""
    turns = [{"from": "human", "value": IMAGE + "\n" + question}]
    return tokenizer_image_token(vicuna_v1_prompt(turns, generation=True), tokenizer)
