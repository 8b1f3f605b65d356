"""The Llama 2 chat format, exactly as Meta's reference code builds it (llama/generation.py, chat_completion).

A system prompt is merged into the first user message as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}``. Each
finished exchange is its own BOS ... EOS segment, ``<s>[INST] {user} [/INST] {answer} </s>``, and an open last
user turn is ``<s>[INST] {user} [/INST]`` with no EOS. The tags are plain text, not special tokens; messages
are stripped; roles must alternate user/assistant, and user text containing a tag is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

Turn = Mapping[str, str]


class ChatFormatError(ValueError):
    """A dialog that cannot be put in the Llama 2 chat format; the message says which turn and why."""


@dataclass(frozen=True)
class Segment:
    """One BOS-started piece of a dialog: the ``[INST] ... [/INST]`` prompt and, when finished, the answer.

    ``answer`` is None for the open last turn (no EOS follows). ``prompt + answer_text`` is the exact text
    that the tokenizer sees between BOS and EOS.
    """

    prompt: str
    answer: str | None

    @property
    def answer_text(self) -> str:
        return "" if self.answer is None else f" {self.answer} "


def check_turns(turns: Sequence[Turn], system: str | None = None) -> None:
    """Raise ChatFormatError unless roles alternate user/assistant starting with user and texts are clean."""
    if not turns:
        raise ChatFormatError("dialog has no turns")
    for i, turn in enumerate(turns):
        role = turn.get("role")
        want = "user" if i % 2 == 0 else "assistant"
        if role not in ("user", "assistant", "system"):
            raise ChatFormatError(f"turn {i}: unknown role {role!r}; roles are user and assistant")
        if role != want:
            raise ChatFormatError(
                f"turn {i}: expected role {want!r}, got {role!r} (roles must alternate, user first)"
            )
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ChatFormatError(f"turn {i}: empty {role} message")
        if role == "user" and any(tag in content for tag in TAGS):
            raise ChatFormatError(f"turn {i}: user text contains a chat tag ({', '.join(TAGS)})")
    if system is not None and any(tag in system for tag in TAGS):
        raise ChatFormatError("system prompt contains a chat tag")


def segments(turns: Sequence[Turn], system: str | None = None) -> list[Segment]:
    """Split a dialog into its BOS..EOS segments. The last segment is open when the last turn is the user's."""
    check_turns(turns, system)
    users = [t["content"].strip() for t in turns[0::2]]
    answers = [t["content"].strip() for t in turns[1::2]]
    if system is not None and system.strip():
        users[0] = f"{B_SYS}{system.strip()}{E_SYS}{users[0]}"
    out = []
    for i, user in enumerate(users):
        answer = answers[i] if i < len(answers) else None
        out.append(Segment(f"{B_INST} {user} {E_INST}", answer))
    return out


def render(turns: Sequence[Turn], system: str | None = None, bos: str = "<s>", eos: str = "</s>") -> str:
    """The dialog as one string with BOS/EOS markers, for reading and for byte-exact tests."""
    parts = []
    for seg in segments(turns, system):
        parts.append(f"{bos}{seg.prompt}{seg.answer_text}{eos if seg.answer is not None else ''}")
    return "".join(parts)
