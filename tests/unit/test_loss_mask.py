"""SFT's loss mask, proven on gradients: prompt positions get none, answer positions do."""

import torch
from paddock.data.tokenize import IGNORE, encode_dialog
from paddock.models import build_causal_lm
from paddock.train.loop import lm_loss


def test_prompt_tokens_get_no_gradient(tok):
    turns = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    ex = encode_dialog(tok, turns, system="Be brief.")
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    model = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=128, seed=0)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    model.lm_head.register_forward_hook(keep)
    lm_loss(model, {"input_ids": ids, "labels": labels}).backward()
    grad = captured["logits"].grad[0]  # (seq, vocab); position t predicts token t + 1
    predicts_answer = torch.tensor([label != IGNORE for label in ex.labels[1:]] + [False])
    per_position = grad.abs().sum(-1)
    assert torch.all(per_position[~predicts_answer] == 0)
    assert torch.all(per_position[predicts_answer] > 0)
    assert predicts_answer.sum() == sum(label != IGNORE for label in ex.labels)
