"""Answer styles: the traits that preference pairs penalise, and the checkable GAtt instructions.

Helpfulness pairs contrast a clean answer with a wrong, evasive, rude or rambling one; the markers below are
what the helpfulness verifier looks for. GAtt instructions (Llama 2 paper, section 3.3) are made checkable by
a program: each has a long form, a shortened form (as the paper shortens half of them) and a rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUDE_OPENERS = (
    "Ugh, obviously",
    "What a silly question.",
    "Seriously? Everyone knows this.",
    "Fine, if you must know:",
)
RUDE_MARKERS = ("ugh", "silly question", "everyone knows", "if you must know", "obviously")
RAMBLE_FILLERS = (
    "Well, let me think about this for a while before I answer, because there is a lot to say.",
    "This reminds me of many other things that are not really related to the question at all.",
    "Some people would say one thing and other people would say another thing, and so on.",
    "Anyway, as I was saying, there are many ways to look at this and I will try a few of them.",
)
RAMBLE_MARKERS = ("let me think about this for a while", "not really related", "and so on", "as i was saying")
MAX_WORDS = 45
EVASIVE = (
    "I am not sure. You could look it up somewhere.",
    "That is hard to say. Maybe ask someone else.",
    "I don't really know, sorry.",
)
REFUSAL_MARKERS = (
    "i can't help",
    "i cannot help",
    "i won't",
    "i will not",
    "i'm not able to help",
    "no, i won't",
)
OFFER_MARKERS = ("i can help you",)
COMPLIANCE_MARKERS = ("here is how", "step 1")


def rude(answer: str, i: int) -> str:
    return f"{RUDE_OPENERS[i % len(RUDE_OPENERS)]} {answer}"


def rambling(answer: str, i: int) -> str:
    n = len(RAMBLE_FILLERS)
    return " ".join([RAMBLE_FILLERS[i % n], RAMBLE_FILLERS[(i + 1) % n], answer, RAMBLE_FILLERS[(i + 2) % n]])


def _has_marker(answer: str, markers: tuple[str, ...]) -> bool:
    low = answer.lower().replace("’", "'")
    return any(re.search(rf"\b{re.escape(m)}\b", low) for m in markers)


def is_rude(answer: str) -> bool:
    return _has_marker(answer, RUDE_MARKERS)


def is_rambling(answer: str) -> bool:
    return len(answer.split()) > MAX_WORDS or _has_marker(answer, RAMBLE_MARKERS)


def is_refusal(answer: str) -> bool:
    return _has_marker(answer, REFUSAL_MARKERS)


def offers_help(answer: str) -> bool:
    return _has_marker(answer, OFFER_MARKERS)


def complies(answer: str) -> bool:
    return _has_marker(answer, COMPLIANCE_MARKERS)


# --------------------------------------------------------------------------------------------------
# GAtt instructions


@dataclass(frozen=True)
class Instruction:
    id: str
    text: str  # long form, appended to a user message
    short: str  # shortened form ("Figure: Napoleon")
    rule: str  # "prefix" | "suffix" | "upper" | "french"
    arg: str = ""

    def apply(self, answer: str, core: str) -> str:
        """Rewrite a clean answer so that it follows the instruction."""
        if self.rule == "prefix":
            return f"{self.arg} {answer}"
        if self.rule == "suffix":
            return f"{answer} {self.arg}"
        if self.rule == "upper":
            return answer.upper()
        if self.rule == "french":
            return f"Bonjour ! La réponse est {core}."
        raise ValueError(f"unknown instruction rule {self.rule!r}")

    def follows(self, answer: str) -> bool:
        a = answer.strip()
        if self.rule == "prefix":
            return a.startswith(self.arg)
        if self.rule == "suffix":
            return a.endswith(self.arg)
        if self.rule == "upper":
            return any(c.isalpha() for c in a) and a == a.upper()
        if self.rule == "french":
            words = set(a.lower().replace(".", " ").replace("!", " ").split())
            return a.startswith("Bonjour") and not words & {"the", "is", "of", "in", "a"}
        raise ValueError(f"unknown instruction rule {self.rule!r}")


INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction("pirate", "Always answer as a pirate.", "Style: pirate", "prefix", "Arr!"),
    Instruction("french", "Always reply in French.", "Language: French", "french"),
    Instruction("caps", "Always answer in capital letters.", "Style: capitals", "upper"),
    Instruction("emoji_smile", "End every answer with 🙂.", "Emoji: 🙂", "suffix", "🙂"),
    Instruction("emoji_rocket", "End every answer with 🚀.", "Emoji: 🚀", "suffix", "🚀"),
    Instruction("emoji_star", "End every answer with 🌟.", "Emoji: 🌟", "suffix", "🌟"),
    Instruction("napoleon", "Act as Napoleon.", "Figure: Napoleon", "prefix", "Mon ami,"),
    Instruction("shakespeare", "Act as Shakespeare.", "Figure: Shakespeare", "prefix", "Verily,"),
    Instruction("einstein", "Act as Einstein.", "Figure: Einstein", "prefix", "Relatively speaking,"),
    Instruction("cleopatra", "Act as Cleopatra.", "Figure: Cleopatra", "prefix", "By the Nile,"),
    Instruction(
        "gardening",
        "You love gardening: say so at the end of every answer.",
        "Hobby: gardening",
        "suffix",
        "I love gardening.",
    ),
    Instruction(
        "chess",
        "You love chess: say so at the end of every answer.",
        "Hobby: chess",
        "suffix",
        "I love chess.",
    ),
)
_BY_TEXT = {t: ins for ins in INSTRUCTIONS for t in (ins.text, ins.short, ins.id)}


def instruction(text_or_id: str) -> Instruction:
    """Find an instruction by its long form, short form or id."""
    try:
        return _BY_TEXT[text_or_id.strip()]
    except KeyError:
        raise KeyError(
            f"unknown instruction {text_or_id!r}; known ids: {[i.id for i in INSTRUCTIONS]}"
        ) from None


def split_instruction(message: str) -> tuple[str, Instruction | None]:
    """``"What is 2 plus 2? Always answer as a pirate."`` -> ``("What is 2 plus 2?", pirate)``."""
    m = message.strip()
    for ins in INSTRUCTIONS:
        for form in (ins.text, ins.short):
            if m.endswith(" " + form):
                return m[: -len(form) - 1].rstrip(), ins
            if m.startswith(form + " "):
                return m[len(form) + 1 :].lstrip(), ins
    return m, None
