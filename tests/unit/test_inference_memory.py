"""Memory discipline of inference outside training: micro-batches under a token budget, log-probs from hidden
states chunk by chunk, inference precision, gradient checkpointing. Peak sizes are read from the tensors the
model makes (hooks), which is deterministic on any machine; timings and RSS are the benchmarks' business."""

from __future__ import annotations

import torch
from paddock.models import build_causal_lm, inference_dtype, load_scalar_model, set_gradient_checkpointing
from paddock.rollout.core import (
    chunked_logprobs,
    micro_batches,
    pack,
    response_logits,
    reward_scores,
    sample,
    sequence_logprobs,
    token_logprobs,
)

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+3?"},
    ],
    [{"role": "user", "content": "Name a colour."}],
]


def _rows(n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, 300, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    responses = [
        torch.randint(3, 300, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    return prompts, responses


def test_micro_batches_keep_order_and_the_budget():
    widths = [10, 30, 5, 40, 40, 3, 100]
    groups = micro_batches(widths, 80)
    assert [i for g in groups for i in g] == list(range(len(widths)))
    for g in groups:
        assert len(g) * max(widths[i] for i in g) <= 80 or len(g) == 1
    assert micro_batches([200], 80) == [[0]]  # a row wider than the budget goes alone


def test_chunked_logprobs_equal_the_full_logits_ones():
    model = build_causal_lm("tiny", vocab_size=300, max_seq_len=128, seed=4).eval()
    prompts, responses = _rows(6)
    packed = pack(prompts, responses)
    with torch.no_grad():
        full = token_logprobs(response_logits(model, packed, 0.8), packed)
        for chunk in (1, 7, 1024):
            torch.testing.assert_close(
                chunked_logprobs(model, packed, 0.8, chunk), full, atol=1e-5, rtol=1e-5
            )
    one_batch = sequence_logprobs(model, prompts, responses, 0.8)
    small = sequence_logprobs(model, prompts, responses, 0.8, token_budget=40, logits_chunk=3)
    for a, b in zip(one_batch, small, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)


def _largest_logits(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen = [0]

    def hook(_m, _inp, out):  # type: ignore[no-untyped-def]
        seen[0] = max(seen[0], out.numel())

    return seen, model.get_output_embeddings().register_forward_hook(hook)


def test_scoring_never_makes_a_logits_tensor_larger_than_its_chunk_whatever_the_batch():
    model = build_causal_lm("tiny", vocab_size=300, max_seq_len=128, seed=4).eval()
    seen, handle = _largest_logits(model)
    for n in (4, 64):
        seen[0] = 0
        prompts, responses = _rows(n, seed=n)
        sequence_logprobs(model, prompts, responses, token_budget=256, logits_chunk=32)
        assert 0 < seen[0] <= 32 * 300, (n, seen[0])  # at most logits_chunk positions x vocabulary
    handle.remove()


def test_reward_scores_in_micro_batches_equal_one_batch(tok, tmp_path):
    lm = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=5)
    lm.save_pretrained(tmp_path, safe_serialization=True)
    torch.manual_seed(0)
    rm = load_scalar_model(tmp_path).eval()
    answers = ["Paris is the capital.", "Five.", "Blue, a colour of the sky and sea."]
    sizes = []
    rm.model.register_forward_hook(lambda _m, inp, out: sizes.append(out.last_hidden_state.shape[0]))
    one = reward_scores(rm, tok, PROMPTS, answers, 128)
    small = reward_scores(rm, tok, PROMPTS, answers, 128, token_budget=40)
    torch.testing.assert_close(one, small, atol=1e-5, rtol=1e-5)
    assert sizes[0] == 3 and max(sizes[1:]) < 3  # one forward of three rows, then smaller micro-batches


def test_generation_in_micro_batches_is_seeded_and_bounded(tok):
    model = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=6).eval()
    rows = []
    model.register_forward_hook(lambda _m, _i, out: rows.append(out.logits.shape[0]))
    kw = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 3, "token_budget": 60}
    a, b = sample(model, tok, PROMPTS * 2, **kw), sample(model, tok, PROMPTS * 2, **kw)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert max(rows) < 6  # never the six prompts in one batch under a 60-token budget
    greedy = sample(model, tok, PROMPTS, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    alone = [
        sample(model, tok, [p], max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)[0] for p in PROMPTS
    ]
    assert [s.response_ids for s in greedy] == [s.response_ids for s in alone]


def test_bf16_inference_logprobs_agree_with_fp32_within_a_stated_tolerance():
    """bf16 keeps 8 bits of mantissa: on untrained tiny models (seeds 7-9) the per-token log-probs of the same
    tokens differed by at most 0.004-0.006 nats, 0.0013-0.0016 on average; the bounds are ten times that."""
    model = build_causal_lm("tiny", vocab_size=300, max_seq_len=128, seed=7).eval()
    prompts, responses = _rows(8, seed=1)
    fp32 = torch.cat([torch.tensor(x) for x in sequence_logprobs(model, prompts, responses)])
    half = model.to(inference_dtype("bf16", on_gpu=False))
    bf16 = torch.cat([torch.tensor(x) for x in sequence_logprobs(half, prompts, responses)])
    diff = (fp32 - bf16).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.015, (diff.max(), diff.mean())
    assert (
        inference_dtype("auto", on_gpu=True) == torch.bfloat16
        and inference_dtype("auto", on_gpu=False) == torch.float32
    )


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    total = [0]

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return loss.detach(), grads, total[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less():
    ids = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    plain = build_causal_lm("tiny", vocab_size=300, max_seq_len=128, seed=8).train()
    ckpt = build_causal_lm("tiny", vocab_size=300, max_seq_len=128, seed=8).train()
    assert set_gradient_checkpointing(ckpt, True) and not set_gradient_checkpointing(plain, None)  # tiny: off
    loss_a, grads_a, kept_a = _saved_bytes(plain, ids)
    loss_b, grads_b, kept_b = _saved_bytes(ckpt, ids)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)
    assert kept_b < 0.2 * kept_a, (kept_a, kept_b)  # measured 1.8 MB against 18.8 MB


def test_answer_nll_in_chunks_equals_the_full_cross_entropy(tok):
    import torch.nn.functional as F
    from paddock.data.tokenize import IGNORE, encode_dialog
    from paddock.rollout.core import answer_nll

    model = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=9).eval()
    dialogs = [
        {"turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
        {
            "system": "Be brief.",
            "turns": [
                {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "Five."},
                {"role": "user", "content": "And 4 plus 4?"},
                {"role": "assistant", "content": "Eight."},
            ],
        },
    ]
    nll, count = 0.0, 0
    with torch.no_grad():
        for d in dialogs:
            ex = encode_dialog(tok, d["turns"], d.get("system"))
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
            target = torch.tensor(ex.labels[1:])
            nll += F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum").item()
            count += int((target != IGNORE).sum())
    got = answer_nll(model, tok, dialogs, 256, logits_chunk=5)
    assert got[1] == count > 0 and abs(got[0] - nll) < 1e-3
