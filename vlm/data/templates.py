"""Chat templates: how a conversation becomes text pieces, each marked supervised or not.

Design choices:
- A template renders a *validated* conversation (optional system, then user/assistant pairs) into
  groups of `Piece`s: group 0 is the preamble (system), group k is the k-th user+assistant pair.
  Supervision is decided here, per piece; `conversation.py` tokenises the whole rendered text as one
  string (split only at images) and labels each token from the character offsets of the pieces it
  covers, so the ids are exactly what tokenising the rendered text gives and the mask is exact.
  Truncation keeps whole groups.
- The supervised piece of a turn is the reply followed by the end-of-turn marker that closes it
  (DESIGN.md, Labels). The generation prompt is the same assistant header used in training, so the
  model continues from exactly the tokens it was trained after.
- Built-in templates follow the references:
  `plain`, `vicuna_v1` (LLaVA's `--version v1`) and `llava_v1` as LLaVA-1.5's `conv_llava_plain`,
  `conv_vicuna_v1` and `conv_llava_v1` together with its `preprocess_multimodal` / `preprocess_v1` /
  `preprocess_plain` (https://github.com/haotian-liu/LLaVA, llava/train/train.py, llava/conversation.py):
  the tokenizer's own BOS id starts the sequence (`tokenizer(prompt)` in LLaVA, so `<s>▁A` with
  sentencepiece, and no BOS for tokenizers that add none), a message's single `<image>` moves to its
  start followed by a newline, and the vicuna prompt ends at "ASSISTANT:" with the space before the
  reply supervised with it; `plain` is BOS + image + caption + "\n" (the newline supervised, no eos).
  `chatml` is Qwen2's format and takes its default system prompt from the tokenizer's own ChatML
  template when it has one (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ..."; Qwen3: none), else
  "You are a helpful assistant." (Qwen2 / Qwen2-VL). `llama3` is Meta's Llama-3.0 format (no default
  system; Llama-3.1's date block comes with `tokenizer`, the model's own template).
- `tokenizer` uses the tokenizer's own Jinja `chat_template`. Assistant spans are found by rendering
  prefixes: the text added by the i-th assistant message is `render(messages[:i+1])` minus
  `render(messages[:i], add_generation_prompt=True)`; the reply is located in it and the end-of-turn
  is the first special token after the reply. A conversation the template cannot render that way
  (Qwen3's thinking removal re-renders earlier turns; Llama's template trims replies) is rejected as
  `template_mismatch` for that sample only.
- A template checks that the tokenizer has each marker it needs as one token: a missing `<|im_start|>`
  would otherwise be spelled out in bytes and train silently on the wrong format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from vlm.errors import ConfigError

from .errors import SampleError
from .tokenizer import IMAGE_TOKEN, special_token_strings, token_id

# LLaVA-1.5's conv_vicuna_v1 (`--version v1`, and the eval conv_mode vicuna_v1).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA's conv_llava_v1 (`--version llava_v1`): the same format with "human" for "user".
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "You are a helpful assistant."  # Qwen2 / Qwen2-VL's default; Qwen2.5 and Qwen3 differ


class Piece(NamedTuple):
    """A run of conversation text; `supervised` pieces get labels, the rest get -100."""

    text: str
    supervised: bool


Groups = list[list[Piece]]  # [preamble, pair 1, pair 2, ...]


@dataclass(frozen=True)
class Template:
    """A chat format. `*_format` strings contain `{content}`; `end_of_turn=None` means the tokenizer's eos.

    Attributes:
        name: registry name.
        bos: text opening the conversation (unsupervised), for formats that spell their BOS out (llama3).
        add_bos_token: start with the BOS id the tokenizer itself adds (`tokenizer(text)`), as LLaVA does;
            nothing for tokenizers that add none.
        system_format: how a system message renders; empty string drops system messages.
        default_system: system message used when the conversation has none (None: no system block).
        system_from_tokenizer: take `default_system` from the tokenizer's own chat template when it
            renders this format (`chatml`): the model's own default, not a guess.
        user_format: how a user message renders.
        assistant_header: opens an assistant reply; also the generation prompt.
        reply_prefix: text that starts every reply, supervised with it (vicuna's space after
            "ASSISTANT:", so the generation prompt ends at the colon, as LLaVA's does).
        end_of_turn: closes each reply; supervised with it.
        end_of_turn_is_token: False when `end_of_turn` is plain text (`plain`'s newline), not a marker.
        turn_separator: text after `end_of_turn` (unsupervised).
        user_text: False drops user text except the `<image>` placeholders (LLaVA's `plain`).
        image_first: a message's single `<image>` moves to its start, followed by "\\n" (LLaVA-1.5's
            `preprocess_multimodal`).
        markers: special tokens the format needs as single tokenizer entries.
        use_chat_template: render with `tokenizer.chat_template` instead of the fields above.
    """

    name: str
    bos: str = ""
    add_bos_token: bool = False
    system_format: str = "{content}"
    default_system: str | None = None
    system_from_tokenizer: bool = False
    user_format: str = "{content}"
    assistant_header: str = ""
    reply_prefix: str = ""
    end_of_turn: str | None = None
    end_of_turn_is_token: bool = True
    turn_separator: str = ""
    user_text: bool = True
    image_first: bool = False
    markers: tuple[str, ...] = ()
    use_chat_template: bool = False
    # Set by `bind`: what the template was bound to, and the BOS ids that tokenizer adds. Binding renders the
    # tokenizer's chat template and tokenises a probe, so a bound template is not bound again per sample.
    bound_to: int | None = dataclasses.field(default=None, compare=False, repr=False)
    bos_ids: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def bind(self, tokenizer: Any) -> Template:
        """This template checked against `tokenizer`, with `end_of_turn` (and a tokenizer-given default
        system) resolved; ValueError if they do not fit. Binding a template bound to `tokenizer` is free."""
        if self.bound_to == id(tokenizer):
            return self
        if self.use_chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    f"template 'tokenizer' needs tokenizer.chat_template, but {type(tokenizer).__name__} has none; "
                    f"pick a built-in template ({', '.join(n for n in TEMPLATES if n != 'tokenizer')})"
                )
            return dataclasses.replace(self, bound_to=id(tokenizer))
        end_of_turn = self.end_of_turn if self.end_of_turn is not None else tokenizer.eos_token
        if end_of_turn is None:
            raise ConfigError(f"template {self.name!r} ends replies with eos, but the tokenizer has no eos_token")
        needed = (*self.markers, end_of_turn) if self.end_of_turn_is_token else self.markers
        missing = [m for m in needed if token_id(tokenizer, m) is None]
        if missing:
            raise ConfigError(
                f"template {self.name!r} needs the special token(s) {missing} but tokenizer "
                f"{type(tokenizer).__name__} lacks them; use the template that matches your LLM (--version) "
                "or 'tokenizer' to use its own chat_template"
            )
        bound = dataclasses.replace(self, end_of_turn=end_of_turn)
        if self.system_from_tokenizer:
            found, system = _default_system_of(bound, tokenizer)
            if found:
                bound = dataclasses.replace(bound, default_system=system)
        return dataclasses.replace(bound, bound_to=id(tokenizer), bos_ids=tuple(self._tokenizer_bos(tokenizer)))

    def leading_ids(self, tokenizer: Any) -> list[int]:
        """Ids before the rendered text: the BOS the tokenizer adds itself, when the template asks for it."""
        return list(self.bind(tokenizer).bos_ids)

    def _tokenizer_bos(self, tokenizer: Any) -> list[int]:
        if not self.add_bos_token or tokenizer.bos_token_id is None:
            return []
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        return [tokenizer.bos_token_id] if probe and probe[0] == tokenizer.bos_token_id else []

    def place_images(self, messages: list[dict]) -> list[dict]:
        """LLaVA-1.5's placement (`image_first`): a message's single `<image>` moves to its start + "\\n"."""
        if not self.image_first:
            return messages
        placed = []
        for message in messages:
            content = message["content"]
            if message["role"] == "user" and content.count(IMAGE_TOKEN) == 1:
                content = (IMAGE_TOKEN + "\n" + content.replace(IMAGE_TOKEN, "").strip()).strip()
            placed.append({**message, "content": content})
        return placed

    def render(self, messages: list[dict], tokenizer: Any, *, add_generation_prompt: bool = False) -> Groups:
        """Render validated `messages` into [preamble, pair 1, ...] groups of pieces.

        For training, `messages` end with an assistant turn. With `add_generation_prompt` they end with
        a user turn and the last group is that turn plus the assistant header (all unsupervised).
        """
        if self.use_chat_template:
            return _render_chat_template(messages, tokenizer, add_generation_prompt)
        assert self.end_of_turn is not None, "call Template.bind(tokenizer) before render"
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        preamble = self.bos
        if system is not None and self.system_format:
            preamble += self.system_format.format(content=system)
        groups: Groups = [[Piece(preamble, False)]]
        for message in self.place_images(messages):
            if message["role"] == "user":
                content = message["content"]
                if not self.user_text:
                    content = IMAGE_TOKEN * content.count(IMAGE_TOKEN)
                groups.append([Piece(self.user_format.format(content=content) + self.assistant_header, False)])
            else:
                reply = self.reply_prefix + message["content"] + self.end_of_turn
                groups[-1] += [Piece(reply, True), Piece(self.turn_separator, False)]
        return groups

    def end_of_turn_token(self, tokenizer: Any) -> str:
        """The marker that closes an assistant reply (generation stops on it when it is one token)."""
        if not self.use_chat_template:
            return self.bind(tokenizer).end_of_turn  # type: ignore[return-value]
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        supervised = [p.text for group in _render_chat_template(probe, tokenizer, False) for p in group if p.supervised]
        return supervised[0][len("y"):].strip()


_VICUNA_V1 = Template(
    name="vicuna_v1",
    add_bos_token=True,
    system_format="{content} ",
    default_system=VICUNA_SYSTEM,
    user_format="USER: {content} ",
    assistant_header="ASSISTANT:",
    reply_prefix=" ",
    end_of_turn="</s>",
    image_first=True,
)

TEMPLATES: dict[str, Template] = {
    "plain": Template(name="plain", add_bos_token=True, system_format="", end_of_turn="\n",
                      end_of_turn_is_token=False, user_text=False, image_first=True),
    "vicuna_v1": _VICUNA_V1,
    "llava_v1": dataclasses.replace(_VICUNA_V1, name="llava_v1", default_system=LLAVA_V1_SYSTEM),
    "chatml": Template(
        name="chatml",
        system_format="<|im_start|>system\n{content}<|im_end|>\n",
        default_system=CHATML_SYSTEM,
        system_from_tokenizer=True,
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_header="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        turn_separator="\n",
        markers=("<|im_start|>",),
    ),
    "llama3": Template(
        name="llama3",
        bos="<|begin_of_text|>",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        markers=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
    "tokenizer": Template(name="tokenizer", use_chat_template=True),
}

# What each name matches, for `--help` and error messages.
DESCRIPTIONS: dict[str, str] = {
    "plain": "LLaVA-1.5 stage 1: BOS + image + caption + newline",
    "vicuna_v1": "LLaVA-1.5 / Vicuna v1 (LLaVA's --version v1, eval conv_mode vicuna_v1)",
    "llava_v1": "LLaVA's conv_llava_v1 ('curious human' system text)",
    "chatml": "Qwen2 ChatML; default system from the tokenizer's own template, else 'You are a helpful assistant.'",
    "llama3": "Llama-3.0 format (for Llama-3.1+ use 'tokenizer': its date block is in the model's template)",
    "tokenizer": "the LLM tokenizer's own chat_template (Qwen2.5, Qwen3, Llama-3.1, ...)",
}

# LLaVA's --version values and other common spellings.
ALIASES: dict[str, str] = {
    "v1": "vicuna_v1",
    "vicuna": "vicuna_v1",
    "qwen": "chatml",
    "qwen_2": "chatml",
    "llava_llama_3": "llama3",
    "llama_3": "llama3",
}


def get_template(name: str, tokenizer: Any = None) -> Template:
    """The template registered as `name` (or a LLaVA `--version` alias), bound to `tokenizer` if given."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        valid = sorted(set(TEMPLATES) | set(ALIASES))
        raise ConfigError(f"unknown chat template {name!r}; valid names: {', '.join(valid)}")
    template = TEMPLATES[key]
    return template if tokenizer is None else template.bind(tokenizer)


def default_template_name(tokenizer: Any, *, captions_stage: bool = False) -> str:
    """The template to use when the user names none: `plain` for stage-1 captions (LLaVA's pretraining),
    otherwise the LLM's own chat template when its tokenizer has one (what an instruct model was trained
    on), else LLaVA-1.5's `vicuna_v1`."""
    if captions_stage:
        return "plain"
    return "tokenizer" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "vicuna_v1"


def _render_chat_template(messages: list[dict], tokenizer: Any, add_generation_prompt: bool) -> Groups:
    """Groups for `tokenizer.chat_template`, assistant spans found by rendering prefixes."""

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        if not msgs:
            return ""
        import jinja2  # transformers renders chat templates with it

        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as exc:  # incl. SecurityError: the sandbox blocked the template reaching out
            where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            what = "was blocked by Jinja's sandbox" if isinstance(exc, jinja2.exceptions.SecurityError) else "failed"
            raise ConfigError(
                f"the chat_template of {where} (chat_template.jinja / tokenizer_config.json) {what}: "
                f"{type(exc).__name__}: {exc}; fix the template or use a built-in one (--conv-mode / --version chatml, "
                "llama3, vicuna_v1)"
            ) from None

    full = render(messages, add_generation_prompt)
    specials = special_token_strings(tokenizer)
    groups: Groups = [[]]
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise SampleError(
                "template_mismatch",
                "the tokenizer's chat_template does not render this conversation prefix by prefix (it rewrites "
                f"earlier turns, e.g. drops reasoning), so assistant turn {i} cannot be located; use a built-in "
                "template instead (--version chatml / llama3 / vicuna_v1)",
            )
        reply = message["content"]
        start = upto.find(reply, len(prompt))
        if start < 0:
            raise SampleError(
                "template_mismatch",
                f"the tokenizer's chat_template changes assistant turn {i}'s text (e.g. strips surrounding "
                "whitespace), so the reply cannot be located in the rendering; clean the reply or use a built-in "
                "template",
            )
        end = start + len(reply)
        tail = upto[end:]
        hits = [(tail.find(s), s) for s in specials if s in tail]
        if not hits:
            raise ConfigError(
                f"the tokenizer's chat_template closes assistant replies with no special token (after the reply: "
                f"{tail!r}), so the model could not learn to stop; use a built-in template instead"
            )
        at, token = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
        end_of_turn = end + at + len(token)
        groups.append([Piece(full[cursor:start], False), Piece(full[start:end_of_turn], True)])
        cursor = end_of_turn
    rest = Piece(full[cursor:], False)
    if add_generation_prompt or len(groups) == 1:
        groups.append([rest])
    else:
        groups[-1].append(rest)
    return groups


_PROBE = "\x00probe\x00"


def _default_system_of(template: Template, tokenizer: Any) -> tuple[bool, str | None]:
    """(True, the system text or None) when the tokenizer's chat template renders `template`'s format for
    a user turn without a system message; (False, None) when it has no template or another format."""
    if not getattr(tokenizer, "chat_template", None):
        return False, None
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                                 add_generation_prompt=True)
    except Exception:  # a template that needs more than one user turn tells us nothing about defaults
        return False, None
    turn = template.user_format.format(content=_PROBE) + template.assistant_header
    if not rendered.endswith(turn) or not rendered.startswith(template.bos):
        return False, None
    preamble = rendered[len(template.bos):len(rendered) - len(turn)]
    if not preamble:
        return True, None
    before, _, after = template.system_format.partition("{content}")
    if preamble.startswith(before) and preamble.endswith(after) and len(preamble) >= len(before) + len(after):
        return True, preamble[len(before):len(preamble) - len(after)]
    return False, None
