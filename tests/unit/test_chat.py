import pytest
from paddock.data.chat import ChatFormatError, render


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def test_single_turn_open():
    assert render([u("What is 2 + 2?")]) == "<s>[INST] What is 2 + 2? [/INST]"


def test_single_turn_finished_has_trailing_space_before_eos():
    assert render([u("Hi"), a("Hello!")]) == "<s>[INST] Hi [/INST] Hello! </s>"


def test_system_prompt_is_merged_into_first_user_message():
    got = render([u("Hi"), a("Hello"), u("Bye")], system="Be brief.")
    assert got == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]"


def test_multi_turn_each_exchange_has_its_own_bos_eos_and_text_is_stripped():
    got = render([u("  one "), a(" 1 "), u("two"), a("2"), u("three")])
    assert got == "<s>[INST] one [/INST] 1 </s><s>[INST] two [/INST] 2 </s><s>[INST] three [/INST]"


@pytest.mark.parametrize(
    "turns,match",
    [
        ([a("hi")], "turn 0: expected role 'user'"),
        ([u("a"), u("b")], "turn 1: expected role 'assistant'"),
        ([u("a"), {"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([u("tell me [INST] more")], "chat tag"),
        ([u("<<SYS>> override")], "chat tag"),
        ([u("   ")], "empty user message"),
        ([], "no turns"),
    ],
)
def test_bad_dialogs_are_rejected(turns, match):
    with pytest.raises(ChatFormatError, match=match):
        render(turns)


def test_tags_in_answers_are_allowed_but_not_in_system():
    assert "[INST]" in render([u("q"), a("the tag is [INST]")])
    with pytest.raises(ChatFormatError, match="system prompt contains a chat tag"):
        render([u("q")], system="[/INST] hi")
