import torch
from paddock.models import build_causal_lm
from paddock.rollout.core import left_pad, sample, sequence_logprobs

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 2 plus 3?"},
    ],
]


def test_left_padding():
    ids, mask = left_pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_behaviour_logprobs_match_an_unpadded_forward(tok):
    model = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=1).eval()
    samples = sample(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=0)
    assert len(samples) == 2
    for s in samples:
        assert len(s.behaviour_logprobs) == len(s.response_ids) > 0
        assert all(lp <= 0 for lp in s.behaviour_logprobs)
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)[-len(s.response_ids) :]
        torch.testing.assert_close(torch.tensor(s.behaviour_logprobs), expected, atol=1e-4, rtol=1e-4)


def test_greedy_sampling_is_deterministic_and_seeded_sampling_repeats(tok):
    model = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=2).eval()
    a = sample(model, tok, PROMPTS, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    b = sample(model, tok, PROMPTS, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=5)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    c = sample(model, tok, PROMPTS, max_new_tokens=8, temperature=1.2, top_p=0.95, seed=7)
    d = sample(model, tok, PROMPTS, max_new_tokens=8, temperature=1.2, top_p=0.95, seed=7)
    assert [s.response_ids for s in c] == [s.response_ids for s in d]
    lp = sequence_logprobs(model, [c[0].prompt_ids], [c[0].response_ids], temperature=1.2)[0]
    assert lp == c[0].behaviour_logprobs
