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
    # Alone rather than in a padded batch of two: the same log-probs up to float rounding (CI once saw 5e-7).
    lp = sequence_logprobs(model, [c[0].prompt_ids], [c[0].response_ids], temperature=1.2)[0]
    torch.testing.assert_close(torch.tensor(lp), torch.tensor(c[0].behaviour_logprobs), atol=1e-5, rtol=1e-5)


def test_sampling_draws_from_the_whole_vocabulary_at_top_p_one(tok):
    """temperature 1 and top_p 1 sample from the model's whole distribution, as the behaviour log-probs assume:
    no implicit top-k (transformers keeps the 50 likeliest tokens unless told otherwise). An untrained model is
    nearly uniform over the vocabulary, so its samples reach far past rank 50."""
    model = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=3).eval()
    samples = sample(model, tok, PROMPTS * 8, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=0)
    ranks = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
            chosen = logits.gather(-1, torch.tensor(s.response_ids).unsqueeze(-1))
            ranks += (logits > chosen).sum(-1).tolist()
    assert len(ranks) > 100 and max(ranks) >= 50, max(ranks)
    assert sorted(ranks)[len(ranks) // 2] > 50  # the median sampled token is beyond a top-50 cut
