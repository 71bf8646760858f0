"""Prompts for streaming video QA: the chat prompt around the video, multiple choice, letter parsing.

Chat prompt. A streaming session pre-fills the part of the chat prompt before the video once per
stream, appends the video as it arrives, and pre-fills the rest with each question. So the prompt
is rendered with the model's own chat template (one user turn: the video, then the question; an
optional system turn first; the generation prompt last) and split at the video placeholder into
`VideoPrompt.prefix` and `VideoPrompt.suffix`. The prefix must not depend on the question (true of
every template that puts the video first in the user turn, as LLaVA-OneVision's does).

Multiple choice, the session's generic form (`StreamingSession.ask(question, options)`; benchmark
evaluation uses each benchmark's own prompt instead, `streamtc.eval.benchmarks`)::

    {question}
    A. {first option}
    B. {second option}
    Answer with the option's letter from the given choices directly.

Options already written as "A. ...", "(A) ..." or "A) ..." keep their letters; plain options get
"A. ", "B. ", ... in order.

Letter parsing (`parse_option_letter`) reads a model's free text and returns the chosen letter or
None. It accepts, in this order of precedence:

1. the letter alone, any case, with brackets or punctuation: "B", "b", "(B)", "B.", "[b]", "**B**";
2. a leading letter with a delimiter: "B. the red cup", "(B) cup", "b) cup", "B: cup";
3. an explicit phrase: "The answer is B", "answer: (c)", "Option D", "the correct choice is C.";
4. a single bracketed letter anywhere: "I think (C) fits best";
5. the text of exactly one option (case-insensitive): "the red cup" -> the option "the red cup".

Only letters of the given options count. A lowercase letter followed by a word ("the answer is a
cup", "a man is ...") is an article, not a choice, and is not read as "A".
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, InputError

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = string.ascii_uppercase

# "A. text", "(A) text", "A) text", "A: text" at the start of an option.
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Za-z])[\.\):]\s*")
# 1. the letter alone.
_ALONE = re.compile(r"^[\W_]*([A-Za-z])[\W_]*$")
# 2. a leading letter with a delimiter.
_LEADING = re.compile(r"^[\s\*\"'`]*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[\.\):](?=\s|$))")
# 3. an explicit phrase; group 1 is the letter, group 2 what follows it.
_PHRASE = re.compile(
    r"\b(?:answer|option|choice)(?:\s*(?:is|:|would be|should be|=))*\s*(?:option\s+|choice\s+)?"
    r"[\(\[\*\"']*([A-Za-z])(?![A-Za-z])(\S*\s*\S?)",
    re.IGNORECASE,
)
# 4. a bracketed letter anywhere.
_BRACKETED = re.compile(r"[\(\[]([A-Za-z])[\)\]]")


@dataclass(frozen=True)
class VideoPrompt:
    """A chat prompt split at the video: prefix (pre-filled once per stream), suffix (per question)."""

    prefix: str
    suffix: str


def chat_messages(question: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Chat messages for one question about one video, in the processors' content-list format."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]})
    return messages


def split_video_prompt(tokenizer: Any, question: str, system_prompt: str | None = None) -> VideoPrompt:
    """Render the tokenizer's chat template for `question` and split it at the video placeholder.

    Raises ConfigError when the tokenizer has no chat template or the rendered prompt does not hold
    exactly one video placeholder.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template")
    video_token = getattr(tokenizer, "video_token", None) or "<video>"
    text = tokenizer.apply_chat_template(
        chat_messages(question, system_prompt), tokenize=False, add_generation_prompt=True
    )
    parts = text.split(video_token)
    if len(parts) != 2:
        raise ConfigError(
            f"the chat template must place exactly one {video_token} placeholder, found {len(parts) - 1} in {text!r}"
        )
    return VideoPrompt(prefix=parts[0], suffix=parts[1])


def format_options(options: Sequence[str]) -> list[str]:
    """Options as lines "A. ...": kept as given when already lettered A, B, C... in order."""
    if not options:
        raise InputError("a multiple-choice question needs at least one option")
    if len(options) > len(OPTION_LETTERS):
        raise InputError(f"at most {len(OPTION_LETTERS)} options are supported, got {len(options)}")
    options = [str(o).strip() for o in options]
    prefixes = [_OPTION_PREFIX.match(o) for o in options]
    if all(m is not None and m.group(1).upper() == OPTION_LETTERS[i] for i, m in enumerate(prefixes)):
        return [f"{OPTION_LETTERS[i]}. {o[m.end():]}" for i, (o, m) in enumerate(zip(options, prefixes))]
    return [f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options)]


def multiple_choice_question(question: str, options: Sequence[str]) -> str:
    """The benchmark-style multiple-choice prompt: question, lettered options, instruction."""
    return "\n".join([question.strip(), *format_options(options), MC_INSTRUCTION])


def _option_texts(options: Sequence[str]) -> list[str]:
    """Option contents without their letter prefix, lowercased."""
    return [line.split(". ", 1)[1].strip().lower() for line in format_options(options)]


def parse_option_letter(text: str, options: Sequence[str] | int) -> str | None:
    """The option letter chosen in a model's answer `text`, or None if it names none.

    options: the options (their count bounds the valid letters, their texts enable rule 5) or just
    the number of options. See the module docstring for the accepted forms.
    """
    count = options if isinstance(options, int) else len(options)
    if count < 1 or count > len(OPTION_LETTERS):
        raise InputError(f"the number of options must lie in [1, {len(OPTION_LETTERS)}], got {count}")
    valid = OPTION_LETTERS[:count]
    text = text.strip()

    def checked(letter: str | None) -> str | None:
        return letter.upper() if letter and letter.upper() in valid else None

    if match := _ALONE.match(text):
        return checked(match.group(1))
    if match := _LEADING.match(text):
        return checked(next(g for g in match.groups() if g))
    for match in _PHRASE.finditer(text):
        letter, after = match.group(1), match.group(2)
        # a lowercase letter followed by a word is an article ("the answer is a cup")
        if letter.islower() and re.match(r"\s+[A-Za-z]", after) and not re.match(r"[\)\]]", after):
            continue
        if found := checked(letter):
            return found
    bracketed = {m.upper() for m in _BRACKETED.findall(text)} & set(valid)
    if len(bracketed) == 1:
        return bracketed.pop()
    if not isinstance(options, int):
        lowered = text.lower().strip(" .!\"'")
        contents = _option_texts(options)
        exact = [i for i, c in enumerate(contents) if c and c == lowered]
        if len(exact) == 1:
            return valid[exact[0]]
        contained = [i for i, c in enumerate(contents) if c and c in lowered]
        if len(contained) == 1:
            return valid[contained[0]]
    return None


__all__ = [
    "MC_INSTRUCTION",
    "OPTION_LETTERS",
    "VideoPrompt",
    "chat_messages",
    "split_video_prompt",
    "format_options",
    "multiple_choice_question",
    "parse_option_letter",
]
