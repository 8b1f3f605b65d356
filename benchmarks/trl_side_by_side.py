"""paddock against TRL on the same model, tokens and hyperparameters: SFT, reward-model training, online RL.

Both sides read identical inputs: paddock's packed SFT windows (ids and answer-only loss mask) and its tokenised
preference pairs with their margins, from one tiny world and tokenizer, starting from the same weights. paddock
runs its stage (Ray Train, 2 workers x 1 thread, ZeRO-2); TRL runs `SFTTrainer` / `RewardTrainer` in one process
with 2 threads (equal cores), with the same optimiser (AdamW 0.9/0.95, eps 1e-5, weight decay 0.1, clip 1.0),
schedule (cosine with warmup), global batch and number of steps. Reported per side: wall time of the whole run,
steady-state tokens/s (median step after warmup), peak resident memory of the training processes, and quality
read the same way for both: perplexity on held-out answers (SFT) and accuracy on held-out pairs (reward model).

Online RL: paddock's PPO (2 rollout workers, 2 learners, and the reference, reward and value models as scorer
actors: one each with ``ppo.placement: split``, all four in one with ``colocated``, whose process takes 2 threads;
and colocated with ``ppo.advantage: rloo``, RLOO's leave-one-out baseline over 2 answers a prompt as TRL's, which
drops the value model) against TRL's `RLOOTrainer` (one process, 2 threads), both from the SFT result above, with the same reward (the reward model above as
helpfulness and safety RM, combined as in Llama 2 and put on the logit scale; paddock's penalty on answers cut off
at the length limit off), the same prompts, answers per update
(256, at most 48 new tokens, temperature 1), optimiser steps (mini-batches of 64, constant LR) and KL coefficient.
Quality is the mean combined reward of greedy answers to held-out prompts. Online RL's rates are over each side's
training loop: TRL's ``trainer.train()`` (generation, scoring and every update; its ``save_model`` after it is not
counted), paddock's PPO from its first weight publication to the driver's receipt of the last update's weights
(``PPOResult.loop_s``: every generation, scoring, update and weight stream; its evaluations, and the learners'
final export and Ray Train's end after it, are not counted; ``end_s`` adds those last two).

    pip install -e '.[bench]'   # TRL and its datasets/accelerate
    python benchmarks/trl_side_by_side.py [--sft-steps 60] [--rm-steps 60] [--rl-updates 6] [--out ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing as mp
import os
import queue
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _world import bench_world, write_result

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, RM_SEQ_LEN, GLOBAL_BATCH, LR, RM_LR, WARMUP = 256, 128, 16, 1e-3, 5e-4, 5
# Online RL: answers per update, mini-batch (one optimiser step each), new tokens, LR and KL coefficient.
# 256 / 64 as the PPO tests settled on (at 64 / 16 the gradient was mostly sampling noise).
RL_BATCH, RL_MINI, RL_NEW_TOKENS, RL_LR, RL_BETA = 256, 64, 48, 2e-5, 0.02


class WorkerMemory:
    """Peak summed RSS of the Ray processes a paddock stage runs on (by their command lines), sampled every 0.2 s."""

    def __init__(self, matches: tuple[str, ...] = ("RayTrainWorker",)) -> None:
        self.matches, self.peak, self._stop = matches, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if (
                    any(m in part for part in (p.info["cmdline"] or []) for m in self.matches)
                    and p.info["memory_info"]
                ):
                    rss += p.info["memory_info"].rss
            self.peak = max(self.peak, rss)
            time.sleep(0.2)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def paddock_stage(kind: str, overrides: list[str]) -> dict[str, Any]:
    from paddock.config import RewardJob, SFTJob, load_config
    from paddock.train.stage import run_supervised

    cls, config, stage = (
        (SFTJob, "sft.yaml", "sft")
        if kind == "sft"
        else (RewardJob, "reward_helpfulness.yaml", "reward_helpfulness")
    )
    job = load_config(cls, REPO / "jobs/configs/tiny" / config, overrides)
    start = time.monotonic()
    with WorkerMemory() as mem:
        result = run_supervised(job, stage)
    steps = job.train.max_steps or 0
    hist = [h for h in result.history if WARMUP < h["step"] < steps]
    return {
        "wall_s": time.monotonic() - start,
        "tokens_per_s": statistics.median(h["train/tokens_per_s"] for h in hist),
        "peak_rss_gb": mem.peak / 1e9,
        "checkpoint": str(result.checkpoint_dir),
    }


def paddock_ppo(
    policy: str,
    rm: str,
    tok_dir: Path,
    world: Path,
    updates: int,
    placement: str,
    engine: str = "transformers",
    advantage: str = "gae",
    aggregation: str = "token-mean",
    seed: int = 0,
) -> dict[str, Any]:
    """The tiny PPO config from ``policy``, with ``rm`` as both reward models; evaluation at the start and end.
    ``engine``: the rollout workers' (``vllm`` where this environment has it, ``make venv-vllm``). ``advantage``
    rloo: RL_BATCH answers as TRL's RLOO samples them, 2 to each of half as many prompts, and no value model."""
    per_prompt = 2 if advantage == "rloo" else 1
    from paddock.config import PPOJob, load_config, paddock_home
    from paddock.ppo.loop import run

    prefix = f"bench-trl-{placement}-{engine}-{advantage}" + (f"-s{seed}" if seed else "")
    job = load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        [
            f"tokenizer={tok_dir}",
            f"policy={policy}",
            f"reward_helpfulness={rm}",
            f"reward_safety={rm}",
            f"ppo.prompts={world}/prompts/train.parquet",
            f"ppo.eval_prompts={world}/prompts/valid.parquet",
            f"ppo.iterations={updates}",
            f"ppo.batch_prompts={RL_BATCH // per_prompt}",
            f"ppo.samples_per_prompt={per_prompt}",
            f"ppo.advantage={advantage}",
            f"ppo.loss_aggregation={aggregation}",
            f"ppo.mini_batch={RL_MINI}",
            f"ppo.max_new_tokens={RL_NEW_TOKENS}",
            f"ppo.beta={RL_BETA}",
            # the reward TRL optimises: no penalty on answers cut off at the length limit
            "ppo.unfinished_penalty=0",
            f"ppo.eval_every={updates * 10}",
            "ppo.eval_max_prompts=8",
            "ppo.patience=null",
            "ppo.kl_limit=null",
            f"ppo.checkpoint_every={updates * 10}",
            f"optim.lr={RL_LR}",
            f"ppo.placement={placement}",
            # sync mode: the one scorer process runs while the rollout workers and learners wait
            *(["ppo.scorer_threads=2"] if placement == "colocated" else []),
            f"registry_prefix={prefix}",
            f"seed={seed}",
            f"inference.engine={engine}",
            *(["inference.vllm.memory_share=0.05"] if engine == "vllm" else []),
        ],
    )
    start = time.monotonic()
    with WorkerMemory(("RayTrainWorker", "ray::RolloutWorker", "ray::Scorer")) as mem:
        result = run(job)
    rollouts = [h for h in result.history if "ppo/response_length" in h]
    assert job.ppo.answers == RL_BATCH
    answers = RL_BATCH * len(rollouts)
    return {
        "wall_s": time.monotonic() - start,
        "loop_s": result.loop_s,
        "end_s": result.wall_s,
        "updates": len(rollouts),
        "samples_per_s": answers / result.loop_s,
        "tokens_per_s": sum(h["ppo/response_length"] * RL_BATCH for h in rollouts) / result.loop_s,
        "peak_rss_gb": mem.peak / 1e9,
        # the last update's weights, as TRL's are: the run registers its best evaluation, which with the two
        # evaluations here (8 prompts each, sampled) is now and then the starting policy
        "checkpoint": str(paddock_home() / "runs" / f"{prefix}-ppo" / "last"),
        "best_iteration": result.best_iteration,
    }


def _trl_child(
    kind: str,
    data: dict[str, Any],
    init: str,
    tok_dir: str,
    out: str,
    steps: int,
    budget_s: float | None,
    results: Any,
    seed: int = 0,
) -> None:
    """One TRL run in its own process (so that its peak RSS is its own), 2 threads."""
    torch.set_num_threads(2)
    from datasets import Dataset
    from paddock.models import PAD_ID, load_causal_lm, load_scalar_model
    from paddock.tokenizer import load_tokenizer
    from transformers import TrainerCallback

    tok = load_tokenizer(tok_dir)
    pad = tok.convert_ids_to_tokens(PAD_ID)
    common = {
        "output_dir": out,
        "per_device_train_batch_size": GLOBAL_BATCH,
        "max_steps": steps,
        "learning_rate": LR if kind == "sft" else RM_LR,
        "lr_scheduler_type": "cosine",
        "warmup_steps": WARMUP,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-5,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "dataloader_num_workers": 0,
        "seed": seed,
        "pad_token": pad,
        "disable_tqdm": True,
    }
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.began = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            times.append(time.perf_counter() - self.t0)
            if budget_s is not None and time.perf_counter() - self.began > budget_s:
                control.should_training_stop = True

    start = time.monotonic()
    counted = [0, 0]  # online RL: answers and new tokens, counted by the reward function
    tokens_per_step = 0  # SFT and RM: a fixed window per step
    if kind == "rl":
        trainer = _trl_rloo(data, init, tok, steps, common, StepTimes(), counted)
    elif kind == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer: Any = SFTTrainer(
            model=load_causal_lm(init),
            args=SFTConfig(**common, max_length=SEQ_LEN, packing=False, completion_only_loss=True),
            train_dataset=Dataset.from_dict(data),
            processing_class=tok,
            callbacks=[StepTimes()],
        )
        tokens_per_step = GLOBAL_BATCH * SEQ_LEN
    else:
        from trl import RewardConfig, RewardTrainer

        model = load_scalar_model(init)
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(**common, max_length=RM_SEQ_LEN, center_rewards_coefficient=None),
            train_dataset=Dataset.from_dict(data),
            processing_class=tok,
            callbacks=[StepTimes()],
        )
        tokens_per_step = 2 * GLOBAL_BATCH * RM_SEQ_LEN  # paddock counts padded pair windows the same way
    began = time.monotonic()
    trainer.train()
    loop = time.monotonic() - began
    trainer.model.config.pad_token_id = PAD_ID
    trainer.save_model(out)
    out_row = {
        "wall_s": time.monotonic() - start,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "checkpoint": out,
    }
    if kind == "rl":
        # Generation, scoring and updates all run inside TRL's training loop: rates over the loop, as for PPO.
        answers, new_tokens = counted
        out_row |= {
            "loop_s": loop,
            "updates": answers // RL_BATCH,
            "samples_per_s": answers / loop,
            "tokens_per_s": new_tokens / loop,
        }
    else:
        out_row["tokens_per_s"] = tokens_per_step / statistics.median(times[WARMUP:])
    results.put(out_row)


def _trl_rloo(
    data: dict[str, Any],
    init: str,
    tok: Any,
    updates: int,
    common: dict[str, Any],
    timer: Any,
    counted: list[int],
) -> Any:
    """TRL's RLOO set up as paddock's PPO runs: the same prompts (rendered in the Llama 2 chat format, BOS
    included, so they tokenise to paddock's prompt ids), reward, answers per update, steps and KL coefficient."""
    from datasets import Dataset
    from paddock.models import load_causal_lm, load_scalar_model
    from paddock.rlhf.ppo import combine_rewards, logit
    from paddock.rollout.core import reward_scores
    from trl import RLOOConfig, RLOOTrainer

    rm = load_scalar_model(data.pop("reward_model")).eval()

    def combined_reward(prompts, completions, completion_ids, user, is_safety, **_):  # type: ignore[no-untyped-def]
        turns = [[{"role": "user", "content": u}] for u in user]
        r = reward_scores(rm, tok, turns, [c.strip() for c in completions], 256)
        counted[0] += len(completions)
        counted[1] += sum(len(c) for c in completion_ids)
        return logit(combine_rewards(r, r, torch.tensor(is_safety))).tolist()

    args = {k: v for k, v in common.items() if k != "pad_token"} | {
        "per_device_train_batch_size": RL_MINI,
        "generation_batch_size": RL_BATCH,
        "num_generations": 2,  # RLOO's baseline is the other answers to the same prompt
        "max_completion_length": RL_NEW_TOKENS,
        "temperature": 1.0,
        "top_p": 1.0,
        "beta": RL_BETA,
        "num_iterations": 1,
        "learning_rate": RL_LR,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_steps": updates * (RL_BATCH // RL_MINI),
    }
    return RLOOTrainer(
        model=load_causal_lm(init),
        reward_funcs=combined_reward,
        args=RLOOConfig(**args),
        train_dataset=Dataset.from_dict(data),
        processing_class=tok,
        callbacks=[timer],
    )


def trl_run(
    kind: str,
    data: dict[str, Any],
    init: str,
    tok_dir: Path,
    out: Path,
    steps: int,
    budget_s: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One TRL run in a child process; ``budget_s`` stops its training after that many seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(
        target=_trl_child, args=(kind, data, init, str(tok_dir), str(out), steps, budget_s, results, seed)
    )
    p.start()
    while True:
        try:
            result = results.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"the TRL {kind} run exited ({p.exitcode}) without a result") from None
    p.join()
    return result


def rm_accuracy(model_dir: str, pairs: dict[str, Any]) -> float:
    """Share of held-out pairs whose chosen answer outscores the rejected one, scored as paddock's reward stage
    scores them in training (``pair_scores`` on ``TokenizePairs``' padded ids)."""
    from paddock.models import load_scalar_model
    from paddock.train.loop import pair_scores

    model = load_scalar_model(model_dir).eval()
    wins: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(pairs["chosen_ids"]), 64):
            batch = {k: torch.from_numpy(pairs[k][i : i + 64]) for k in ("chosen_ids", "rejected_ids")}
            chosen, rejected = pair_scores(model, batch)
            wins += (chosen > rejected).tolist()
    return sum(wins) / len(wins)


def held_out_reward(model_dir: str, rm_dir: str, tok_dir: Path, prompts: list[dict[str, Any]]) -> float:
    """Mean combined reward (sigmoid scale) of greedy answers to ``prompts``, ``rm_dir`` as both reward models."""
    from paddock.models import load_causal_lm, load_scalar_model
    from paddock.rlhf.ppo import combine_rewards
    from paddock.rollout.core import greedy_answers, reward_scores
    from paddock.tokenizer import load_tokenizer

    tok, turns = load_tokenizer(tok_dir), [p["turns"] for p in prompts]
    texts = greedy_answers(load_causal_lm(model_dir).eval(), tok, turns, RL_NEW_TOKENS)
    r = reward_scores(load_scalar_model(rm_dir).eval(), tok, turns, texts, 256)
    return combine_rewards(r, r, torch.tensor([p["is_safety"] for p in prompts])).mean().item()


def rl_prompts(world: Path, tok_dir: Path) -> dict[str, list[Any]]:
    """The RL training prompts as TRL reads them: the Llama 2 chat prompt text (BOS included), checked to
    tokenise to exactly the ids paddock's rollout workers generate from, plus the columns the reward reads."""
    import pyarrow.parquet as pq
    from paddock.data.chat import segments
    from paddock.data.tokenize import encode_prompt
    from paddock.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    rows = pq.read_table(world / "prompts" / "train.parquet").to_pylist()
    # A SentencePiece-style tokenizer adds the word-start marker that paddock's prompt begins with only at the
    # start of a text, not after BOS: one of the two joins gives paddock's ids exactly, for every prompt.
    texts: list[str] = []
    for r in rows:
        want, prompt = encode_prompt(tok, r["turns"]), segments(r["turns"])[0].prompt
        joins = [tok.bos_token + sep + prompt for sep in ("", " ")]
        match = [t for t in joins if tok(t, add_special_tokens=False)["input_ids"] == want]
        if not match:
            raise RuntimeError(f"no text form of {prompt!r} tokenises to paddock's prompt ids")
        texts.append(match[0])
    return {
        "prompt": texts,
        "user": [r["turns"][0]["content"] for r in rows],
        "is_safety": [r["is_safety"] for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--rm-steps", type=int, default=60)
    ap.add_argument("--rl-updates", type=int, default=6, help="PPO iterations (RLOO: as many generations)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument(
        "--rloo-aggregation",
        default="seq-mean-token-sum",
        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
        help="ppo.loss_aggregation of the colocated rloo row; by default TRL's RLOO weighting (a sum over each "
        "answer's tokens, a mean over answers)",
    )
    ap.add_argument(
        "--rl-seeds",
        type=int,
        default=1,
        help="run the colocated rloo row and TRL's RLOO with seeds 0..N-1 and report the quality of each (the "
        "spread says how far one run's quality may be read; speed stays seed 0's)",
    )
    args = ap.parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit("trl_side_by_side: TRL is not installed; pip install -e '.[bench]'") from None

    home, world, tok_dir, _ = bench_world(
        "paddock-bench-trl-", pretrain_mb=0.3, rl_prompts=600, vocab_size=2000, dialogs=1500
    )
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from paddock.cluster import connect
    from paddock.data.tokenize import IGNORE
    from paddock.evaluate import answer_perplexity
    from paddock.models import PAD_ID, build_causal_lm
    from paddock.tokenizer import load_tokenizer
    from paddock.train.data import TokenizeAndPack, TokenizePairs

    tok = load_tokenizer(tok_dir)
    init = home / "init"
    build_causal_lm("tiny", len(tok), SEQ_LEN, seed=0).save_pretrained(init, safe_serialization=True)
    tok.save_pretrained(init)

    # The same tokens for both: paddock's packed windows and tokenised pairs.
    windows = TokenizeAndPack(str(tok_dir), "dialogs", SEQ_LEN)(
        pq.read_table(world / "sft" / "train.parquet")
    )
    sft_data = {
        "input_ids": windows["input_ids"].tolist(),
        "completion_mask": (windows["labels"] != IGNORE).astype(int).tolist(),
    }
    pairs_fn = TokenizePairs(str(tok_dir), RM_SEQ_LEN, "small")

    def unpadded(table: Any) -> dict[str, Any]:
        p = pairs_fn(table)
        strip = lambda a: [[t for t in row if t != PAD_ID] for row in a.tolist()]  # noqa: E731
        return {
            "chosen_ids": strip(p["chosen_ids"]),
            "rejected_ids": strip(p["rejected_ids"]),
            "margin": p["margin"].tolist(),
        }

    test_prefs = pq.read_table(world / "preferences" / "test.parquet")
    rm_test = pairs_fn(test_prefs.filter(pc.equal(test_prefs["kind"], "helpfulness")))
    held_out = pq.read_table(world / "sft" / "test.parquet").to_pylist()[:100]

    connect()
    common = [
        f"tokenizer={tok_dir}",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.zero_stage=2",
    ]
    rows = []
    sft_paddock = paddock_stage(
        "sft",
        [
            *common,
            f"model.init_from={init}",
            f"data.train={world}/sft/train.parquet",
            f"data.test={world}/sft/test.parquet",
            f"data.seq_len={SEQ_LEN}",
            f"train.micro_batch_size={GLOBAL_BATCH // 2}",
            f"train.max_steps={args.sft_steps}",
            f"train.eval_every={args.sft_steps * 10}",
            f"optim.lr={LR}",
            f"optim.warmup_steps={WARMUP}",
            "registry_prefix=bench-trl",
        ],
    )
    sft_trl = trl_run("sft", sft_data, str(init), tok_dir, home / "trl-sft", args.sft_steps)
    for side, r in (("paddock", sft_paddock), ("TRL", sft_trl)):
        r["quality"] = answer_perplexity(r.pop("checkpoint"), held_out, SEQ_LEN)
        rows.append({"name": f"SFT, {side}", "quality_metric": "held-out answer perplexity", **r})

    # Both reward models start from paddock's SFT result and read the pairs paddock's stage mixed (helpfulness
    # plus as many safety pairs, Llama 2's recipe), which it writes under its run directory.
    rm_init = str(home / "runs" / "bench-trl-sft" / "final")
    rm_paddock = paddock_stage(
        "rm",
        [
            *common,
            f"model.init_from={rm_init}",
            f"data.train={world}/preferences/train.parquet",
            f"data.test={world}/preferences/test.parquet",
            f"data.seq_len={RM_SEQ_LEN}",
            f"train.micro_batch_size={GLOBAL_BATCH // 2}",
            f"train.max_steps={args.rm_steps}",
            f"train.eval_every={args.rm_steps * 10}",
            f"optim.lr={RM_LR}",
            "registry_prefix=bench-trl",
        ],
    )
    rm_train = unpadded(
        pq.read_table(home / "runs" / "bench-trl-rm-helpfulness" / "data" / "train-helpfulness.parquet")
    )
    rm_trl = trl_run("rm", rm_train, rm_init, tok_dir, home / "trl-rm", args.rm_steps)
    rm_dir = rm_paddock["checkpoint"]
    for side, r in (("paddock", rm_paddock), ("TRL", rm_trl)):
        r["quality"] = rm_accuracy(r.pop("checkpoint"), rm_test)
        rows.append({"name": f"reward model, {side}", "quality_metric": "held-out pair accuracy", **r})

    # Online RL from the SFT result, paddock's reward model as the reward for both.
    rl_test = pq.read_table(world / "prompts" / "test.parquet").to_pylist()[:100]
    ppo = paddock_ppo(rm_init, rm_dir, tok_dir, world, args.rl_updates, "split")
    colocated = paddock_ppo(rm_init, rm_dir, tok_dir, world, args.rl_updates, "colocated")

    def paddock_rloo(seed: int = 0) -> dict[str, Any]:
        return paddock_ppo(
            rm_init,
            rm_dir,
            tok_dir,
            world,
            args.rl_updates,
            "colocated",
            advantage="rloo",
            aggregation=args.rloo_aggregation,
            seed=seed,
        )

    colocated_rloo = paddock_rloo()
    on_vllm = importlib.util.find_spec("vllm") is not None
    colocated_vllm = (
        paddock_ppo(rm_init, rm_dir, tok_dir, world, args.rl_updates, "colocated", "vllm")
        if on_vllm
        else None
    )
    rl_data = rl_prompts(world, tok_dir) | {"reward_model": rm_dir}
    rloo = trl_run("rl", rl_data, rm_init, tok_dir, home / "trl-rloo", args.rl_updates)
    # TRL again, for as long as paddock's PPO loop ran (its set-up excluded, as TRL's is): quality in equal time.
    rloo_timed = trl_run("rl", rl_data, rm_init, tok_dir, home / "trl-rloo-timed", 10**6, ppo["loop_s"])
    start_reward = held_out_reward(rm_init, rm_dir, tok_dir, rl_test)
    runs = [
        ("paddock PPO, split", ppo),
        ("paddock PPO, colocated", colocated),
        ("paddock PPO, colocated, rloo advantage", colocated_rloo),
    ]
    if colocated_vllm is not None:
        runs.append(("paddock PPO, colocated, vLLM engine", colocated_vllm))
    for side, r in (*runs, ("TRL RLOO", rloo), ("TRL RLOO, PPO's time", rloo_timed)):
        r["quality"] = held_out_reward(r.pop("checkpoint"), rm_dir, tok_dir, rl_test)
        rows.append({"name": f"online RL, {side}", "quality_metric": "held-out greedy reward", **r})
    trl_row = rows[4 + len(runs)]
    for a, b in ((rows[0], rows[1]), (rows[2], rows[3]), *((r, trl_row) for r in rows[4 : 4 + len(runs)])):
        a["tokens_per_s_vs_trl"] = a["tokens_per_s"] / b["tokens_per_s"]
        a["wall_vs_trl"] = a["wall_s"] / b["wall_s"]
    for r in rows[4 : 4 + len(runs)]:
        r["samples_per_s_vs_trl"] = r["samples_per_s"] / rloo["samples_per_s"]
    # The same two RLOOs with other seeds (prompt order and sampling): how much of a quality gap is one run's luck.
    seeded: dict[str, list[float]] = {
        "online RL, paddock PPO, colocated, rloo advantage": [],
        "online RL, TRL RLOO": [],
    }
    for seed in range(1, args.rl_seeds):
        again = paddock_rloo(seed)
        trl_again = trl_run(
            "rl", rl_data, rm_init, tok_dir, home / f"trl-rloo-s{seed}", args.rl_updates, seed=seed
        )
        for name, r in zip(seeded, (again, trl_again), strict=True):
            seeded[name].append(held_out_reward(r["checkpoint"], rm_dir, tok_dir, rl_test))
    for r in rows:
        if r["name"] in seeded and args.rl_seeds > 1:
            qs = [r["quality"], *seeded[r["name"]]]
            r |= {
                "quality_seeds": qs,
                "quality_mean": statistics.mean(qs),
                "quality_min": min(qs),
                "quality_max": max(qs),
            }
    by_name = {r["name"]: r for r in rows}
    ours, theirs = (by_name[n].get("quality_seeds") for n in seeded)
    if ours and theirs and len(ours) > 1:
        # paddock's mean less TRL's, and the standard error of that difference (the seeds' spread, each side's
        # own): within two of it the two means are not told apart by this many seeds
        se = math.sqrt(statistics.variance(ours) / len(ours) + statistics.variance(theirs) / len(theirs))
        by_name["online RL, paddock PPO, colocated, rloo advantage"] |= {
            "quality_mean_vs_trl": statistics.mean(ours) - statistics.mean(theirs),
            "quality_mean_vs_trl_se": se,
        }

    meta = {
        "trl": trl.__version__,
        "shape": "tiny",
        "global_batch": GLOBAL_BATCH,
        "sft_steps": args.sft_steps,
        "rm_steps": args.rm_steps,
        "rl_updates": args.rl_updates,
        "rloo_loss_aggregation": args.rloo_aggregation,
        "rl_seeds": args.rl_seeds,
        "rl_answers_per_update": RL_BATCH,
        "rl_start_reward": start_reward,
        "vllm_row": "measured" if on_vllm else "skipped: vLLM is not installed here (run in .venv-vllm)",
    }
    write_result(args.out, "trl_side_by_side", meta, rows)
    print(f"online RL starts from held-out greedy reward {start_reward:.3f}; RL rows count new tokens")
    print(f"\npaddock vs TRL {trl.__version__} (tiny model, {os.cpu_count()} CPUs, equal cores)")
    print(f"{'run':<50} {'wall s':>8} {'tokens/s':>10} {'peak GB':>8} {'quality':>9}")
    for r in rows:
        print(
            f"{r['name']:<50} {r['wall_s']:>8.1f} {r['tokens_per_s']:>10.0f} {r['peak_rss_gb']:>8.2f} {r['quality']:>9.3f}"
        )
    for r in rows:
        if "quality_seeds" in r:
            seeds = ", ".join(f"{q:.3f}" for q in r["quality_seeds"])
            print(
                f"{r['name']}: held-out greedy reward over seeds 0-{args.rl_seeds - 1}: {seeds} (mean {r['quality_mean']:.3f})"
            )
        if "quality_mean_vs_trl" in r:
            print(
                f"  mean less TRL's: {r['quality_mean_vs_trl']:+.3f} (standard error {r['quality_mean_vs_trl_se']:.3f})"
            )


if __name__ == "__main__":
    main()
