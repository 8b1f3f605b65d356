from paddock.data.tokenize import IGNORE, Example, encode_dialog, encode_pretrain, encode_prompt, pack

TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
]


def trained_spans(ex):
    """Contiguous runs of trained label ids."""
    spans, cur = [], []
    for label in ex.labels:
        if label == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(label)
    return spans + ([cur] if cur else [])


def test_sft_mask_trains_answers_and_eos_only(tok):
    ex = encode_dialog(tok, TURNS, system="Be brief.")
    assert len(ex.input_ids) == len(ex.labels)
    assert ex.input_ids.count(1) == 2 and ex.input_ids.count(2) == 2  # BOS and EOS per exchange
    spans = trained_spans(ex)
    # Meta's format trains " {answer} " then EOS: the trailing space is part of the answer.
    assert [tok.decode(s[:-1]) for s in spans] == ["The capital of France is Paris. ", "2 plus 3 is 5. "]
    assert all(s[-1] == tok.eos_token_id for s in spans)
    # The prompt, system prompt, tags and BOS never carry loss.
    masked = [i for i, label in zip(ex.input_ids, ex.labels, strict=True) if label == IGNORE]
    text = tok.decode(masked)
    assert "[INST]" in text and "Be brief." in text and "Paris" not in text


def test_tokens_equal_the_rendered_chat_string(tok):
    from paddock.data.chat import render

    ex = encode_dialog(tok, TURNS)
    pieces = render(TURNS, bos="", eos="").replace("[INST]", "\x00[INST]").split("\x00")[1:]
    expected = []
    for piece in pieces:
        expected += [1, *tok.encode(piece, add_special_tokens=False), 2]
    assert ex.input_ids == expected


def test_gatt_mask_trains_only_the_last_answer(tok):
    ex = encode_dialog(tok, TURNS, train_on="last_answer")
    assert [tok.decode(s[:-1]) for s in trained_spans(ex)] == ["2 plus 3 is 5. "]


def test_prompt_for_generation_ends_open(tok):
    ids = encode_prompt(tok, TURNS[:3])
    assert ids[-1] != tok.eos_token_id
    assert tok.decode(ids).endswith("What is 2 plus 3? [/INST]")


def test_pretrain_trains_every_token(tok):
    ex = encode_pretrain(tok, "Paris is the capital of France.")
    assert ex.labels == ex.input_ids and ex.input_ids[0] == 1 and ex.input_ids[-1] == 2


def test_packing_keeps_every_token_in_fixed_windows():
    examples = [
        Example([1, 5, 6, 2], [IGNORE, 5, 6, 2]),
        Example([1, 7, 2], [IGNORE, 7, 2]),
        Example([1, 8, 9, 10, 2], [1, 8, 9, 10, 2]),
    ]
    packed = list(pack(examples, seq_len=5, pad_id=0))
    assert [len(p) for p in packed] == [5, 5, 5]
    flat = [t for p in packed for t in p.input_ids]
    assert flat[:12] == [1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 10, 2] and flat[12:] == [0, 0, 0]
    # Position ids restart with each example, with the part of one cut off, and with the padding; a token at
    # position 0 is predicted from nothing, so its label is IGNORE.
    assert [p.position_ids for p in packed] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    labels = [t for p in packed for t in p.labels]
    assert labels[:12] == [IGNORE, 5, 6, 2, IGNORE, IGNORE, 2, IGNORE, 8, 9, IGNORE, 2]
    assert labels[12:] == [IGNORE] * 3


def test_dialog_packing_keeps_each_example_in_one_window():
    examples = [
        Example([1, 5, 6, 2], [IGNORE, 5, 6, 2]),
        Example([1, 7, 8, 2], [IGNORE, IGNORE, 8, 2]),  # does not fit in the 2 places left: starts window 2
        Example([1, 9], [IGNORE, 9]),
        Example([1, 3, 4, 5, 6, 7, 2], [IGNORE, 3, 4, 5, 6, 7, 2]),  # longer than a window: spans 3 and 4
    ]
    packed = list(pack(examples, seq_len=6, pad_id=0, split_examples=False))
    assert [p.input_ids for p in packed] == [
        [1, 5, 6, 2, 0, 0],
        [1, 7, 8, 2, 1, 9],
        [1, 3, 4, 5, 6, 7],
        [2, 0, 0, 0, 0, 0],
    ]
    assert packed[0].labels == [IGNORE, 5, 6, 2, IGNORE, IGNORE]
    assert packed[1].labels == [IGNORE, IGNORE, 8, 2, IGNORE, 9]
    assert packed[3].labels == [IGNORE] * 6
    assert [p.position_ids for p in packed] == [
        [0, 1, 2, 3, 0, 1],
        [0, 1, 2, 3, 0, 1],
        [0, 1, 2, 3, 4, 5],
        [0, 0, 1, 2, 3, 4],
    ]
    # The same examples cut wherever a window ends, as pretraining text is.
    assert next(pack(examples, seq_len=6, pad_id=0)).input_ids == [1, 5, 6, 2, 1, 7]
