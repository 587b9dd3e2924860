"""Chat templates: how a conversation becomes text pieces, each marked supervised or not.

Design choices:
- A template renders a *validated* conversation (optional system, then user/assistant pairs) into
  groups of `Piece`s: group 0 is the preamble (bos, system), group k is the k-th user+assistant pair.
  Supervision is decided here, per piece, so `conversation.py` tokenises piece by piece and the label
  mask is exact by construction; truncation keeps whole groups.
- The supervised piece of a turn is the reply followed by the end-of-turn token that closes it
  (DESIGN.md, Labels). The generation prompt is the same assistant header used in training, so the
  model continues from exactly the tokens it was trained after.
- Built-in templates follow the references: `plain` and `vicuna_v1` as LLaVA-1.5 (`conv_llava_plain`,
  `conv_vicuna_v1`: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."), `chatml` as Qwen2's template,
  `llama3` as Meta's. One deliberate difference from LLaVA's vicuna: LLaVA's generation prompt ends
  with "ASSISTANT:" and relies on the tokenizer gluing the space to the reply; we tokenise by pieces,
  so the header is "ASSISTANT: " in training and generation alike.
- `tokenizer` uses the tokenizer's own Jinja `chat_template`. Assistant spans are found by rendering
  prefixes: the text added by the i-th assistant message is `render(messages[:i+1])` minus
  `render(messages[:i], add_generation_prompt=True)`; the reply is located in it and the end-of-turn
  is the first special token after the reply. Templates that re-render earlier turns (Qwen3's thinking
  removal) break the prefix property and are rejected with a clear error.
- A template checks that the tokenizer has each marker it needs as one token: a missing `<|im_start|>`
  would otherwise be spelled out in bytes and train silently on the wrong format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from .tokenizer import IMAGE_TOKEN, token_id

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "You are a helpful assistant."


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
        bos: text opening the conversation (unsupervised).
        system_format: how a system message renders; empty string drops system messages.
        default_system: system message used when the conversation has none (None: no system block).
        user_format: how a user message renders.
        assistant_header: opens an assistant reply; also the generation prompt.
        reply_prefix: text that starts every reply, supervised with it (vicuna's space after
            "ASSISTANT:", so the generation prompt ends at the colon, as LLaVA's does).
        end_of_turn: closes each reply; supervised with it.
        turn_separator: text after `end_of_turn` (unsupervised).
        user_text: False drops user text except the `<image>` placeholders (LLaVA's `plain`).
        markers: special tokens the format needs as single tokenizer entries.
        use_chat_template: render with `tokenizer.chat_template` instead of the fields above.
    """

    name: str
    bos: str = ""
    system_format: str = "{content}"
    default_system: str | None = None
    user_format: str = "{content}"
    assistant_header: str = ""
    reply_prefix: str = ""
    end_of_turn: str | None = None
    turn_separator: str = ""
    user_text: bool = True
    markers: tuple[str, ...] = ()
    use_chat_template: bool = False

    def bind(self, tokenizer: Any) -> Template:
        """This template checked against `tokenizer`, with `end_of_turn` resolved; ValueError if they do not fit."""
        if self.use_chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    f"template 'tokenizer' needs tokenizer.chat_template, but {type(tokenizer).__name__} has none; "
                    f"pick a built-in template ({', '.join(n for n in TEMPLATES if n != 'tokenizer')})"
                )
            return self
        end_of_turn = self.end_of_turn if self.end_of_turn is not None else tokenizer.eos_token
        if end_of_turn is None:
            raise ValueError(f"template {self.name!r} ends replies with eos, but the tokenizer has no eos_token")
        missing = [m for m in (*self.markers, end_of_turn) if token_id(tokenizer, m) is None]
        if missing:
            raise ValueError(
                f"template {self.name!r} needs the special token(s) {missing} but tokenizer "
                f"{type(tokenizer).__name__} lacks them; use the template that matches your LLM (--version) "
                "or 'tokenizer' to use its own chat_template"
            )
        return dataclasses.replace(self, end_of_turn=end_of_turn)

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
        for message in messages:
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
        """The token that closes an assistant reply (generation stops on it)."""
        if not self.use_chat_template:
            return self.bind(tokenizer).end_of_turn  # type: ignore[return-value]
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        supervised = [p.text for group in _render_chat_template(probe, tokenizer, False) for p in group if p.supervised]
        return supervised[0][len("y"):].strip()


TEMPLATES: dict[str, Template] = {
    "plain": Template(name="plain", system_format="", user_text=False),
    "vicuna_v1": Template(
        name="vicuna_v1",
        bos="<s>",
        system_format="{content} ",
        default_system=VICUNA_SYSTEM,
        user_format="USER: {content} ",
        assistant_header="ASSISTANT:",
        reply_prefix=" ",
        end_of_turn="</s>",
        markers=("<s>",),
    ),
    "chatml": Template(
        name="chatml",
        system_format="<|im_start|>system\n{content}<|im_end|>\n",
        default_system=CHATML_SYSTEM,
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

# LLaVA's --version values and other common spellings.
ALIASES: dict[str, str] = {
    "v1": "vicuna_v1",
    "llava_v1": "vicuna_v1",
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
        raise ValueError(f"unknown chat template {name!r}; valid names: {', '.join(valid)}")
    template = TEMPLATES[key]
    return template if tokenizer is None else template.bind(tokenizer)


def _render_chat_template(messages: list[dict], tokenizer: Any, add_generation_prompt: bool) -> Groups:
    """Groups for `tokenizer.chat_template`, assistant spans found by rendering prefixes."""

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, add_generation_prompt)
    specials = _special_token_strings(tokenizer)
    groups: Groups = [[]]
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError(
                "the tokenizer's chat_template does not render conversations prefix by prefix (it rewrites "
                f"earlier turns, e.g. drops reasoning), so assistant turn {i} cannot be located; use a built-in "
                "template instead (--version chatml / llama3 / vicuna_v1)"
            )
        reply = message["content"]
        start = upto.find(reply, len(prompt))
        if start < 0:
            raise ValueError(
                f"the tokenizer's chat_template changes assistant turn {i}'s text (e.g. strips it), so the reply "
                "cannot be located in the rendering; use a built-in template instead"
            )
        end = start + len(reply)
        tail = upto[end:]
        hits = [(tail.find(s), s) for s in specials if s in tail]
        if not hits:
            raise ValueError(
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


def _special_token_strings(tokenizer: Any) -> list[str]:
    """All special-token strings of `tokenizer` (named ones and added ones flagged special)."""
    found = set(tokenizer.all_special_tokens)
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            found.add(str(added))
    return sorted(found)
