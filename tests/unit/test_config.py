from pathlib import Path

import pytest
from paddock.config import JOBS, ConfigError, TokenizerJob, WorldJob, load_config, resolve_path

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_validates(path: Path):
    assert path.stem in JOBS, f"{path}: no job model registered for '{path.stem}' in paddock.config.JOBS"
    cfg = load_config(JOBS[path.stem], path)
    assert cfg.registry_prefix


@pytest.mark.reliability
def test_error_names_every_bad_field(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "world:\n  seed: -1\n  pretrain_mb: 0\n  colour: blue\n  test_fraction: 0.7\nexperiments: x\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(WorldJob, bad)
    msg = str(err.value)
    assert "5 invalid field(s)" in msg
    assert "world.seed: input should be greater than or equal to 0, got -1" in msg
    assert "world.pretrain_mb: input should be greater than 0, got 0" in msg
    assert "world.test_fraction: input should be less than 0.5, got 0.7" in msg
    assert "world.colour: unknown field, got 'blue' (known fields:" in msg
    assert "experiments: unknown field" in msg and "experiment" in msg.split("experiments: unknown field")[1]


@pytest.mark.reliability
def test_overrides_are_typed_and_validated(tmp_path: Path):
    cfg = load_config(WorldJob, None, ["world.seed=7", "world.pretrain_mb=0.5", "experiment=x"])
    assert (cfg.world.seed, cfg.world.pretrain_mb, cfg.experiment) == (7, 0.5, "x")
    with pytest.raises(ConfigError, match=r"world.sft_dialogs: input should be a valid integer"):
        load_config(WorldJob, None, ["world.sft_dialogs=many"])
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_config(WorldJob, None, ["world.seed"])


@pytest.mark.reliability
def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(WorldJob, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(WorldJob, tmp_path / "list.yaml")


def test_tokenizer_existing_must_be_a_directory(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"tokenizer\.existing: no such directory"):
        load_config(TokenizerJob, None, [f"tokenizer.existing={tmp_path / 'missing'}"])


def test_relative_paths_resolve_under_paddock_home(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    assert resolve_path("world") == tmp_path / "world"
    assert resolve_path("/abs/x") == Path("/abs/x")


def test_local_mode_is_refused_where_workers_are_the_design():
    """``train.num_workers: 0`` (the loop in the driver) suits a supervised fine-tune; PPO's learners are Ray Train
    workers, so a PPO config with it fails at load, naming the field."""
    from paddock.config import PPOJob, SFTJob

    configs = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny"
    assert load_config(SFTJob, configs / "sft.yaml", ["train.num_workers=0"]).train.num_workers == 0
    with pytest.raises(ConfigError, match=r"train.num_workers: PPO's learners are Ray Train workers"):
        load_config(PPOJob, configs / "ppo.yaml", ["train.num_workers=0"])


@pytest.mark.reliability
def test_the_vllm_engine_is_chosen_per_job_and_refuses_what_it_cannot_run():
    from paddock.config import PPOJob

    base = Path(__file__).resolve().parents[2] / "jobs/configs/tiny/ppo.yaml"
    cfg = load_config(PPOJob, base, ["inference.engine=vllm", "inference.vllm.memory_share=0.3"])
    assert cfg.inference.engine == "vllm" and cfg.inference.vllm.memory_share == 0.3
    assert load_config(PPOJob, base).inference.engine == "transformers"  # the default: no extra needed
    with pytest.raises(ConfigError, match=r"inference.engine: input should be 'transformers' or 'vllm'"):
        load_config(PPOJob, base, ["inference.engine=sglang"])
    with pytest.raises(
        ConfigError, match=r"tensor_parallel: 8 devices per engine needs inference.engine vllm"
    ):
        load_config(PPOJob, base, ["inference.vllm.tensor_parallel=8"])
    spread = load_config(PPOJob, base, ["inference.engine=vllm", "inference.vllm.tensor_parallel=2"])
    assert spread.inference.worker_ranks == 2 and cfg.inference.worker_ranks == 1
    shared = [
        "ppo.placement=colocated",
        "train.use_gpu=true",
        "train.gpus_per_worker=0.6",
        "ppo.gpus_per_actor=0.4",
    ]
    shared += ["ppo.rollout_workers=1", "train.num_workers=1"]
    with pytest.raises(ConfigError, match=r"an engine over several GPUs runs in the split placement"):
        load_config(PPOJob, base, ["inference.engine=vllm", "inference.vllm.tensor_parallel=2", *shared])


def test_starting_vllm_workers_without_vllm_fails_before_any_actor_starts(monkeypatch):
    import importlib.util

    from paddock.rollout import actors

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"make venv-vllm"):
        actors.start_workers(
            "/nowhere",
            2,
            max_new_tokens=8,
            temperature=1.0,
            top_p=1.0,
            num_cpus=0.5,
            inference={"engine": "vllm"},
        )


@pytest.mark.reliability
def test_a_vllm_context_beyond_the_models_is_refused_before_any_worker_starts(tmp_path: Path):
    import json

    from paddock.rollout.vllm_engine import check_settings

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    check_settings(str(tmp_path), {"max_model_len": 256})
    check_settings(str(tmp_path), {"max_model_len": None})
    with pytest.raises(ValueError, match=r"max_model_len \(512\) is beyond the model's context \(256"):
        check_settings(str(tmp_path), {"max_model_len": 512})


@pytest.mark.reliability
def test_a_tensor_parallel_engine_that_cannot_split_the_model_or_its_gpus_is_refused_before_any_worker_starts(
    tmp_path: Path,
):
    import json

    from paddock.rollout import actors
    from paddock.rollout.vllm_engine import check_settings

    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    check_settings(str(tmp_path), {"tensor_parallel": 4})
    with pytest.raises(
        ValueError, match=r"tensor_parallel \(8\) must divide the model's attention heads \(4"
    ):
        check_settings(str(tmp_path), {"tensor_parallel": 8})
    with pytest.raises(ValueError, match=r"a rollout worker whose engine spans 2 GPUs .* takes them whole"):
        actors.start_workers(
            str(tmp_path),
            1,
            max_new_tokens=8,
            temperature=1.0,
            top_p=1.0,
            num_cpus=0.5,
            num_gpus=0.5,
            inference={"engine": "vllm", "vllm": {"tensor_parallel": 2}},
        )


@pytest.mark.reliability
def test_ppo_hands_its_rollout_workers_the_vllm_share_and_group_ranks_its_placement_implies(monkeypatch):
    """Colocated on GPUs, vLLM takes the worker's GPU share (not its 0.85 default beside a learner); with tensor
    parallelism each worker takes one rank per vLLM process in a publication's group."""
    from paddock.config import PPOJob
    from paddock.ppo import loop, sync

    started: list = []

    class Fake:
        @staticmethod
        def options(**kw):
            return Fake

        @staticmethod
        def remote(*a, **kw):
            return object()

    monkeypatch.setattr(
        loop, "workers_from", lambda policy, p, inference, *a, **kw: started.append(inference)
    )
    monkeypatch.setattr(loop, "Scorer", Fake)
    monkeypatch.setattr(loop, "Scorers", Fake)
    base = Path(__file__).resolve().parents[2] / "jobs/configs/tiny/ppo.yaml"
    channel = sync.Channel("127.0.0.1", 1, "gloo", "float32", 10.0)
    shared = ["ppo.placement=colocated", "train.use_gpu=true", "train.gpus_per_worker=0.6"]
    shared += [
        "ppo.gpus_per_actor=0.4",
        "ppo.rollout_workers=2",
        "train.num_workers=2",
        "inference.engine=vllm",
    ]
    job = load_config(PPOJob, base, shared)
    actors = loop.Actors(job, "p", "h", "s", None, channel)
    assert started[-1].vllm.memory_share == 0.4 and actors.width == 1
    job = load_config(PPOJob, base, ["inference.engine=vllm", "inference.vllm.tensor_parallel=2"])
    actors = loop.Actors(job, "p", "h", "s", None, channel)
    assert started[-1].vllm.memory_share is None and actors.width == 2
