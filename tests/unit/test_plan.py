"""The capacity planner: its formulas against DeepSpeed's own estimators, the shipped GPU configs on the clusters
they name, and refusals that name the role, the missing GiB and the keys to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paddock import plan
from paddock.cli import run_plan
from paddock.models import count_parameters

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIGS = sorted((REPO / "jobs/configs/llama2-7b").glob("*.yaml"))


@pytest.mark.parametrize("shape", ["tiny", "7b", "70b"])
def test_shapes_count_the_parameters_of_the_built_models(shape):
    assert plan.ModelShape.named(shape).params == count_parameters(shape)
    assert plan.ModelShape.named(shape, scalar=True).params == count_parameters(shape, scalar=True)


@pytest.mark.parametrize(("shape", "nodes"), [("7b", 2), ("7b", 4), ("70b", 8)])
def test_model_states_agree_with_deepspeeds_estimators(shape, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    m = plan.ModelShape.named(shape)
    ranks = 8 * nodes
    _, ds2 = estimate_zero2_model_states_mem_needs(m.params, 8, nodes, cpu_offload=False)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        m.params, m.largest_layer, 8, nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True
    )
    ours2, _ = plan.model_states_bytes(m.params, m.largest_layer, 2, ranks)
    ours3, _ = plan.model_states_bytes(m.params, m.largest_layer, 3, ranks)
    assert abs(ours2 - ds2) / ds2 < 0.10 and abs(ours3 - ds3) / ds3 < 0.10, (ours2, ds2, ours3, ds3)
    off, host = plan.model_states_bytes(m.params, m.largest_layer, 3, ranks, offload=True)
    _, ds3_off, _ = estimate_zero3_model_states_mem_needs(
        m.params, m.largest_layer, 8, nodes, cpu_offload=True, cpu_offload_params=False, zero_init=True
    )
    assert abs(off - ds3_off) / ds3_off < 0.10 and host > 0


def _plan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = run_plan("plan", [*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip().startswith("{") else {}


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_7b_stage_fits_the_cluster_it_names(config, capsys):
    code, result = _plan(["--config", str(config)], capsys)
    assert code == 0 and result["fits"] is True, result
    assert result["cluster"] == "paddock-aws"
    for r in result["roles"]:
        assert {"role", "count", "gpus_per_process", "device_gib", "host_gib", "fits", "reason"} <= set(r)


def test_an_oversized_override_is_refused_naming_the_role_and_the_keys(capsys):
    code, result = _plan(
        ["--config", str(REPO / "jobs/configs/llama2-7b/ppo.yaml"), "--set", "ppo.rollout_workers=256"],
        capsys,
    )
    assert code == 1 and result["fits"] is False
    bad = [r for r in result["roles"] if not r["fits"]]
    assert [r["role"] for r in bad] == ["rollout worker"] and "ppo.rollout_workers" in bad[0]["reason"]
    code, result = _plan(
        [
            "--config",
            str(REPO / "jobs/configs/llama2-7b/ppo.yaml"),
            "--set",
            "inference.dtype=fp32",
            "--set",
            "inference.token_budget=200000",
        ],
        capsys,
    )
    bad = {r["role"]: r["reason"] for r in result["roles"] if not r["fits"]}
    assert code == 1 and "rollout worker" in bad and "GiB missing" in bad["rollout worker"]


TRAINING_70B = ["pretrain", "sft", "reward_helpfulness", "reward_safety", "tokenizer"]
INFERENCE_70B = [
    "rejection_sampling",
    "ppo",
    "gatt",
    "context_distillation",
    "evaluate",
    "promote",
    "pipeline",
]


@pytest.mark.parametrize("stage", TRAINING_70B)
def test_every_70b_training_stage_fits_the_h100_cluster_it_names(stage, capsys):
    code, result = _plan(["--config", str(REPO / f"jobs/configs/llama2-70b/{stage}.yaml")], capsys)
    assert code == 0 and result["fits"] is True, result
    assert result["cluster"] == "paddock-aws-h100"


@pytest.mark.parametrize("stage", INFERENCE_70B)
def test_70b_stages_with_an_inference_copy_are_refused_for_want_of_tensor_parallel_inference(stage, capsys):
    code, result = _plan(["--config", str(REPO / f"jobs/configs/llama2-70b/{stage}.yaml")], capsys)
    reasons = {r["role"]: r["reason"] for r in result["roles"] if not r["fits"]}
    assert code == 1 and reasons, result
    assert all("tensor-parallel inference" in why for why in reasons.values()), reasons
    assert not [r for r in result["roles"] if "learner" in r["role"] and not r["fits"]]  # training fits


def test_a_70b_sampler_spread_over_eight_gpus_by_vllm_fits_where_the_scorers_still_do_not(capsys):
    config = str(REPO / "jobs/configs/llama2-70b/rejection_sampling.yaml")
    _, one = _plan(["--config", config], capsys)
    spread = ["inference.engine=vllm", "inference.vllm.tensor_parallel=8", "rejection.gpus_per_actor=1"]
    code, tp = _plan(["--config", config, *[a for s in spread for a in ("--set", s)]], capsys)
    before = {r["role"]: r for r in one["roles"]}
    after = {r["role"]: r for r in tp["roles"]}
    assert not before["rollout worker"]["fits"]
    assert "inference.engine=vllm and inference.vllm.tensor_parallel" in before["rollout worker"]["reason"]
    worker = after["rollout worker"]
    assert worker["fits"] and worker["gpus_per_process"] == 8  # one vLLM process on each GPU of a node
    # each GPU holds an eighth of the copy: 70B parameters in bf16 / 8 is 16.1 GiB of weights, the rest KV cache
    assert 16.0 < worker["device_gib"] < 0.3 * before["rollout worker"]["device_gib"]
    assert code == 1 and not after["helpfulness RM scorer"]["fits"]
    assert "paddock's scorers do not have" in after["helpfulness RM scorer"]["reason"]
    # an engine wider than a node (its 8 GPUs) cannot be placed: Ray gives an actor its GPUs on one node
    wider = ["inference.engine=vllm", "rejection.gpus_per_actor=1", "inference.vllm.tensor_parallel=16"]
    _, wide = _plan(["--config", config, *[a for s in wider for a in ("--set", s)]], capsys)
    worker = {r["role"]: r for r in wide["roles"]}["rollout worker"]
    assert (
        not worker["fits"]
        and "takes 16 GPUs, which must be on one node; the cluster's nodes have at most 8"
        in (worker["reason"])
    )


def test_zero3_learners_are_planned_partitioned_on_the_host():
    from paddock.config import TrainConfig

    m = plan.ModelShape.named("70b")
    gib = 1 << 30
    z3 = plan.learner_role("l", [m], TrainConfig(num_workers=64, use_gpu=True, zero_stage=3), 4096)
    z2 = plan.learner_role("l", [m], TrainConfig(num_workers=64, use_gpu=True, zero_stage=2), 4096)
    assert z3.host_gib == pytest.approx(4 * m.largest_layer / gib, abs=0.01)  # one module read at a time
    assert z2.host_gib == pytest.approx(6 * m.params / gib, abs=0.01)  # loaded whole in fp32 first


def test_colocated_scorers_are_planned_as_one_process_whose_models_take_turns(capsys):
    config = str(REPO / "jobs/configs/llama2-7b/ppo.yaml")
    _, split = _plan(["--config", config], capsys)
    code, colocated = _plan(["--config", config, "--set", "ppo.placement=colocated"], capsys)
    scorers = [r for r in split["roles"] if r["role"].endswith("scorer")]
    assert len(scorers) == 4
    (one,) = [r for r in colocated["roles"] if r["role"].startswith("scorers")]
    assert code == 0 and one["count"] == 1
    assert one["gpus_per_process"] == 1 == min(1, sum(r["gpus_per_process"] for r in scorers))  # one device
    # the weights add up; the working memory is the largest scorer's, not the four's
    assert max(r["device_gib"] for r in scorers) < one["device_gib"] < sum(r["device_gib"] for r in scorers)
    assert not [r for r in colocated["roles"] if r["role"].endswith("scorer")]


def test_rloo_plans_no_value_model(capsys):
    config = str(REPO / "jobs/configs/llama2-7b/ppo.yaml")
    _, gae = _plan(["--config", config], capsys)
    rloo_set = ["--set", "ppo.advantage=rloo", "--set", "ppo.samples_per_prompt=2"]
    code, rloo = _plan(["--config", config, *rloo_set], capsys)
    roles = {r["role"]: r for r in rloo["roles"]}
    assert code == 0 and "value scorer" not in roles and "learner (policy)" in roles
    before = {r["role"]: r for r in gae["roles"]}
    # the learners hold one 7B model and its optimiser states instead of two
    assert roles["learner (policy)"]["device_gib"] < before["learner (policy + value)"]["device_gib"]
    code, together = _plan(["--config", config, *rloo_set, "--set", "ppo.placement=colocated"], capsys)
    assert [r["role"] for r in together["roles"] if r["role"].startswith("scorers")] == [
        "scorers (reference, both RMs)"
    ]


def test_the_tiny_pipeline_fits_this_machine(capsys):
    code, result = _plan(
        ["--config", str(REPO / "jobs/configs/tiny/ppo.yaml"), "--set", "plan.shape=tiny"], capsys
    )
    assert code == 0 and result["fits"], result
    assert all(r["gpus_per_process"] == 0 for r in result["roles"])


def test_a_gpu_node_type_without_its_memory_label_is_an_error(tmp_path):
    text = (REPO / "clusters/gcp-a100.yaml").read_text().replace('paddock.io/gpu-memory-gib: "40", ', "")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(plan.PlanError, match="gpu-memory-gib"):
        plan.Cluster.from_yaml(tmp_path / "c.yaml")


def test_vllm_rollout_workers_are_planned_with_their_host_mirror_once(capsys):
    """On a GPU the mirror is the host copy the weights load into, kept (counted once, as the transformers engine's
    load is); on a CPU vLLM's own copy is host memory too, and the mirror comes beside it."""
    config = str(REPO / "jobs/configs/llama2-7b/ppo.yaml")
    _, hf = _plan(["--config", config], capsys)
    code, vl = _plan(["--config", config, "--set", "inference.engine=vllm"], capsys)
    (w_hf,) = [r for r in hf["roles"] if r["role"] == "rollout worker"]
    (w_vl,) = [r for r in vl["roles"] if r["role"] == "rollout worker"]
    weights = plan.ModelShape.named("7b").params * 2 / (1 << 30)  # bf16 on a GPU
    assert code == 0 and w_vl["device_gib"] == w_hf["device_gib"]
    assert w_vl["host_gib"] == pytest.approx(weights, abs=0.01) == w_hf["host_gib"]

    on_cpu = ["--config", str(REPO / "jobs/configs/tiny/ppo.yaml"), "--set", "plan.shape=7b"]
    _, hf = _plan(on_cpu, capsys)
    _, vl = _plan([*on_cpu, "--set", "inference.engine=vllm"], capsys)  # 7B on this machine: does not fit
    (w_hf,) = [r for r in hf["roles"] if r["role"] == "rollout worker"]
    (w_vl,) = [r for r in vl["roles"] if r["role"] == "rollout worker"]
    weights = plan.ModelShape.named("7b").params * 4 / (1 << 30)  # fp32 on a CPU
    assert w_vl["device_gib"] == w_hf["device_gib"] == 0 and w_hf["host_gib"] > weights
    assert w_vl["host_gib"] == pytest.approx(w_hf["host_gib"] + weights, abs=0.01)


def test_picking_answers_by_reward_plans_the_two_reward_scorers_after_the_samplers(capsys):
    config = str(REPO / "jobs/configs/llama2-7b/collect_preferences.yaml")
    _, plain = _plan(["--config", config], capsys)
    assert [r["role"] for r in plain["roles"]] == ["rollout worker", "driver"]
    pick = [
        "--set",
        "collect.samples=4",
        "--set",
        "reward_helpfulness=models:/llama2-7b-rm-helpfulness@latest",
        "--set",
        "reward_safety=models:/llama2-7b-rm-safety@latest",
    ]
    code, picked = _plan(["--config", config, *pick], capsys)
    assert code == 0 and picked["fits"], picked
    roles = {r["role"]: r for r in picked["roles"]}
    assert set(roles) == {"rollout worker", "helpfulness RM scorer", "safety RM scorer", "driver"}
    assert roles["helpfulness RM scorer"]["device_gib"] > 0 and roles["safety RM scorer"]["count"] == 1


def test_colocated_learners_and_rollout_workers_take_turns_on_one_gpu(capsys):
    """On GPUs, ppo.placement colocated pairs each learner with a rollout worker on one GPU: the device holds the
    larger turn (or the weight stream between them) when the engine sleeps and the learner rests, and both
    together when they do not."""
    config = str(REPO / "jobs/configs/llama2-7b/ppo.yaml")
    shares = ["train.gpus_per_worker=0.6", "ppo.gpus_per_actor=0.4", "train.zero_stage=2"]
    shares += ["train.num_workers=8", "ppo.rollout_workers=8"]
    sets = [a for kv in shares for a in ("--set", kv)]
    _, split = _plan(["--config", config, *sets], capsys)
    roles = {r["role"]: r for r in split["roles"]}
    learner, worker = roles["learner (policy + value)"], roles["rollout worker"]
    assert learner["gpus_per_process"] == 0.6 and worker["gpus_per_process"] == 0.4
    weights = plan.ModelShape.named("7b").params * 2 / (1 << 30)  # bf16
    code, turns = _plan(["--config", config, *sets, "--set", "ppo.placement=colocated"], capsys)
    (pair,) = [r for r in turns["roles"] if "taking turns" in r["role"]]
    assert code == 0 and turns["fits"] and pair["count"] == 8 and pair["gpus_per_process"] == 1
    # the weight stream is the peak here: the learner awake and the engine's weights back, its KV cache not
    expected = max(worker["device_gib"], learner["device_gib"] + weights)
    assert pair["device_gib"] == pytest.approx(expected, abs=0.02)
    assert not [r for r in turns["roles"] if r["role"] in ("rollout worker", "learner (policy + value)")]
    awake = ["--set", "ppo.engine_sleep=false", "--set", "ppo.learner_offload=false"]
    _, both = _plan(["--config", config, *sets, "--set", "ppo.placement=colocated", *awake], capsys)
    (pair,) = [r for r in both["roles"] if "taking turns" in r["role"]]
    assert pair["device_gib"] == pytest.approx(learner["device_gib"] + worker["device_gib"], abs=0.02)
    assert not pair["fits"] and "ppo.engine_sleep" in pair["reason"]


def test_engine_sleep_and_learner_offload_default_on_where_learners_and_engines_share_gpus():
    from paddock.config import PPOJob, load_config

    config = REPO / "jobs/configs/llama2-7b/ppo.yaml"
    shared = ["ppo.placement=colocated", "train.gpus_per_worker=0.75", "ppo.gpus_per_actor=0.25"]
    job = load_config(PPOJob, config, [*shared, "train.zero_stage=2"])
    assert job.colocated_gpus and job.engines_sleep and job.learners_offload
    zero3 = load_config(
        PPOJob, config, shared
    )  # the shipped ZeRO-3: DeepSpeed offloads none with torch's AdamW
    assert zero3.engines_sleep and not zero3.learners_offload
    split = load_config(PPOJob, config, [])
    assert not (split.colocated_gpus or split.engines_sleep or split.learners_offload)
    with pytest.raises(ValueError, match="ZeRO 1 or 2"):
        load_config(PPOJob, config, [*shared, "ppo.learner_offload=true"])
    with pytest.raises(ValueError, match="sync mode"):
        load_config(PPOJob, config, [*shared, "ppo.engine_sleep=true", "ppo.mode=async"])
    # pairs: learners on more than half a GPU each (never two on one), shares within one GPU, one worker each
    with pytest.raises(ValueError, match="more than half a GPU"):
        load_config(PPOJob, config, [*shared, "train.gpus_per_worker=0.5"])
    with pytest.raises(ValueError, match=r"add up to 1\.05"):
        load_config(PPOJob, config, [*shared, "train.gpus_per_worker=0.8"])
    with pytest.raises(ValueError, match=r"as many as train\.num_workers"):
        load_config(PPOJob, config, [*shared, "ppo.rollout_workers=8", "ppo.batch_prompts=512"])
