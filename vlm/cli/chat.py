"""`vlm chat --model PATH --image IMG`: a multi-turn conversation about images in the terminal.

Each line typed is a user turn; the answer is streamed to stdout, prompts and notes go to stderr (so
`vlm chat ... < questions.txt > answers.txt` works). The whole history is sent every turn.
Commands: `/image PATH` attaches an image to the next question, `/reset` forgets the history (the
current image is attached again to the next question), `/exit` (or end of input) quits, `/help`.

At a terminal, lines are read through `readline` (editing, and the session's earlier lines with the
up arrow); Ctrl-C clears the line being typed or stops the answer being generated (the history stays
as it was), Ctrl-D quits. Without an image the model answers from the text alone, which is said once.
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from vlm.generate.chat import ChatSession
from vlm.generate.decoding import LINE_ERRORS

HELP = "commands: /image PATH (attach an image to the next question), /reset (forget the history), /exit"
PROMPT = "USER: "
NO_IMAGE = "note: no image attached; the model answers from the text alone (attach one with /image PATH)"


def enable_line_editing() -> bool:
    """Import `readline`, which is what gives `input()` line editing and history; False where it is missing
    (Windows without pyreadline)."""
    try:
        import readline
    except ImportError:
        return False
    readline.set_auto_history(True)
    return True


def _isatty(stream: Any) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def _read_line(lines: IO[str], err: IO[str], *, interactive: bool, editing: bool) -> str:
    """The next line ('' at end of input). `editing`: through `input()`, i.e. readline; its prompt goes to
    stdout, which is then the terminal too."""
    if editing:
        try:
            return input(PROMPT) + "\n"
        except EOFError:
            return ""
    if interactive:
        err.write(PROMPT)
        err.flush()
    return lines.readline()


def _undecodable(line: str) -> str | None:
    """Where `line` is not UTF-8 text ("byte 0xff at column 7"), or None. Python's stdin keeps undecodable
    bytes as lone surrogates (`surrogateescape`, U+DC80..U+DCFF); any lone surrogate cannot be encoded."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(line[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        return f"{what} at column {exc.start + 1}"
    return None


def chat_loop(session: ChatSession, lines: IO[str], out: IO[str], err: IO[str], *, stream: bool) -> int:
    """The read-answer loop over `lines` (stdin); returns the exit code."""
    interactive = _isatty(lines)
    # input() edits lines only on the process's own terminal: stdin and stdout both ttys
    editing = interactive and lines is sys.stdin and _isatty(sys.stdout) and enable_line_editing()
    noted_no_image = False
    number, rejected = 0, 0
    while True:
        try:
            line = _read_line(lines, err, interactive=interactive, editing=editing)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop what was typed, ask again
            err.write("\n")
            continue
        except UnicodeDecodeError as exc:  # a strict stdin: the rest of the stream cannot be trusted
            err.write(f"error: input line {number + 1} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
                      "stopping: save the questions as UTF-8\n")
            return 2
        if not line:
            if interactive:  # Ctrl-D: end the prompt's line, one word, no traceback
                err.write("\nbye\n")
            return 2 if rejected and not interactive else 0
        number += 1
        bad = _undecodable(line)
        if bad is not None:  # the tokenizer would fail on it with a TypeError
            err.write(f"error: input line {number} is not UTF-8 text ({bad}); line skipped: save the questions "
                      "as UTF-8\n")
            rejected += 1
            continue
        text = line.strip()
        if not text:
            continue
        command, _, rest = text.partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            err.write(HELP + "\n")
        elif command == "/reset":
            session.reset()
            err.write("history cleared\n")
        elif command == "/image":
            try:
                session.set_image(rest.strip())
                err.write(f"image {rest.strip()!r} will go with your next question\n")
            except LINE_ERRORS as exc:
                err.write(f"error: {exc}\n")
        elif text.startswith("/"):
            err.write(f"unknown command {command!r}; {HELP}\n")
        else:
            if session.current_image is None and not noted_no_image:
                err.write(NO_IMAGE + "\n")
                noted_no_image = True
            try:
                answer = session.ask(text, stream=out if stream else None)
            except LINE_ERRORS as exc:
                err.write(f"error: {exc}\n")
                continue
            except KeyboardInterrupt:  # Ctrl-C while answering: stop it; ask() changed no history
                out.flush()
                err.write("\n(answer interrupted; the conversation is as it was before the question)\n")
                continue
            if not stream:
                out.write(answer + "\n")
                out.flush()


def main(argv: list[str] | None = None) -> int:
    from vlm.cli.options import add_decoding_arguments, add_model_arguments, generator_from_args

    parser = argparse.ArgumentParser(prog="vlm chat", description=__doc__.split("\n\n")[0], epilog=HELP)
    add_model_arguments(parser)
    parser.add_argument("--image", "--image-file", "--image_file", "--image_path", dest="image", default=None,
                        help="image to talk about (more with /image PATH)")
    add_decoding_arguments(parser, max_new_tokens=512)
    args = parser.parse_args(argv)
    session = ChatSession(generator_from_args(args), args.image)  # a mistake here: one line by vlm.cli.run
    print(f"chatting with {args.model} (template {session.generator.template!r}); {HELP}", file=sys.stderr)
    return chat_loop(session, sys.stdin, sys.stdout, sys.stderr, stream=sys.stdout.isatty())
