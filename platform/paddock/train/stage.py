"""Driver side of a supervised stage: check inputs, prepare data, run the Ray Train workers, record the result.

Everything that can be wrong with the inputs (config, tokenizer, upstream model, datasets) fails here,
before any worker starts. Rank 0 puts each report's step records on a Ray queue that this driver reads (the same
in local mode, where the loop runs in the driver): it draws the progress bar and is MLflow's only writer.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.train import UserCallback
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from paddock import atomic, plan, tracking
from paddock.cluster import actor_model, connect
from paddock.config import (
    FinetuneJob,
    PretrainJob,
    RewardJob,
    SFTJob,
    SupervisedJob,
    load_config,
    paddock_home,
    resolve_path,
)
from paddock.data.pairs import reward_mix
from paddock.data.schemas import DIALOGS
from paddock.data.validate import load_dataset
from paddock.models import count_parameters, llama_config, write_ensemble
from paddock.tokenizer import check_matches, load_tokenizer, tokenizer_files
from paddock.train.data import packed_dataset, pairs_dataset
from paddock.train.engine import torch_trainer
from paddock.train.loop import LoopSpec, train_worker


@dataclass
class StageResult:
    stage: str
    run_id: str
    checkpoint_dir: Path
    model_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class Progress:
    """A tqdm bar with step, loss and tokens/s on a terminal; plain log lines every ~5% otherwise."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total = stage, total
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=stage, unit="step", dynamic_ncols=True)

    def update(self, m: dict[str, float]) -> None:
        step = int(m["step"])
        info = f"loss {m['train/loss']:.4f} | {m['train/tokens_per_s']:.0f} tok/s"
        if "eval/loss" in m:
            info += f" | eval {m['eval/loss']:.4f}"
        if "eval/accuracy" in m:
            info += f" | acc {m['eval/accuracy']:.3f}"
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(info)
            self.bar.refresh()
        elif step % self.every == 0 or step == self.total or "eval/loss" in m or "eval/accuracy" in m:
            print(f"[{self.stage}] step {step}/{self.total} | {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def registry_suffix(job: SupervisedJob) -> str:
    if job.registry_suffix:
        return job.registry_suffix
    if isinstance(job, RewardJob):
        return f"rm-{job.reward.kind}"
    return "sft" if isinstance(job, SFTJob) else "base"


def loss_curve(history: list[dict[str, float]], title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train/loss"] for h in history], label="train loss")
    evals = [(h["step"], h["eval/loss"]) for h in history if "eval/loss" in h]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _prepare(
    job: SupervisedJob, tokenizer_dir: Path, work_dir: Path, seed: int
) -> tuple[ray.data.Dataset, ray.data.Dataset, list[tuple[Path, str, str, int, int]]]:
    """(train dataset, eval dataset, dataset inputs to log). Validation and quarantine happen here."""
    d = job.data
    train_path = resolve_path(d.train)
    test_path = resolve_path(d.test) if d.test else None
    if test_path is None:
        raise ValueError("data.test: every supervised stage evaluates on a test split; give its path")
    inputs = []
    if isinstance(job, RewardJob):
        out = []
        for split, path in (("train", train_path), ("eval", test_path)):
            report = load_dataset(
                path,
                "preferences",
                quarantine_dir=work_dir / "quarantine",
                max_bad_fraction=d.max_bad_fraction,
                max_chars=d.max_chars,
            )
            rows = (
                reward_mix(report.good.to_pylist(), job.reward.kind, job.reward.mix_ratio, seed)
                if split == "train"
                else [r for r in report.good.to_pylist() if r["kind"] == job.reward.kind]
            )
            mixed = work_dir / "data" / f"{split}-{job.reward.kind}.parquet"
            mixed.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_parquet(pa.Table.from_pylist(rows, schema=report.good.schema), mixed)
            inputs.append(
                (
                    path,
                    f"preferences-{path.stem}",
                    "training" if split == "train" else "eval",
                    report.total,
                    report.n_bad,
                )
            )
            out.append(pairs_dataset(mixed, tokenizer_dir, seq_len=d.seq_len, margin=job.reward.margin))
        return out[0], out[1], inputs
    kind = "pretrain" if isinstance(job, PretrainJob) else "dialogs"
    train_on = job.train_on if isinstance(job, SFTJob) else "answers"
    prepared = []
    for split, path in (("training", train_path), ("eval", test_path)):
        p = packed_dataset(
            path,
            kind,
            tokenizer_dir,
            seq_len=d.seq_len,
            train_on=train_on,
            max_bad_fraction=d.max_bad_fraction,
            max_chars=d.max_chars,
            work_dir=work_dir,
        )
        inputs.append((path, f"{kind}-{path.parent.name}-{path.stem}", split, p.report.total, p.report.n_bad))
        prepared.append(p.dataset)
    return prepared[0], prepared[1], inputs


def fit_in_thread(trainer: TorchTrainer, then: Any = None) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``trainer.fit()`` in a daemon thread; ``box`` gets its ``result`` or ``error``, then ``then()`` runs."""
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:
            box["error"] = exc
        finally:
            if then is not None:
                then()

    thread = threading.Thread(target=fit, name="paddock-fit", daemon=True)
    thread.start()
    return thread, box


def _follow(
    trainer: TorchTrainer,
    queue: Queue,
    run: tracking.StageRun,
    progress: Progress,
    history: list[dict[str, float]],
    prefix: str = "",
) -> Any:
    """Run ``trainer.fit()`` in a thread while this thread logs every report rank 0 puts on ``queue`` (its
    metric names behind ``prefix``)."""
    thread, box = fit_in_thread(trainer)
    while True:
        alive = thread.is_alive()
        try:
            while True:
                report = queue.get(timeout=0.5)
                for m in report.get("records", [report]):
                    if not history and int(m["step"]) > 1:
                        print(
                            f"[{progress.stage}] resumed from the checkpoint at step {int(m['step']) - 1} "
                            "(an earlier attempt of this stage)",
                            flush=True,
                        )
                    history.append(m)
                    logged = {k if k == "step" else f"{prefix}{k}": v for k, v in m.items()}
                    run.log_metrics(logged, step=int(m["step"]), send=False)
                    progress.update(m)
                run.send()  # a report's steps in one request
        except Empty:
            pass
        if not alive:
            break
    thread.join()
    progress.close()
    if "error" in box:
        raise box["error"]
    return box["result"]


@dataclass
class Prepared:
    """A stage with its inputs checked and its data materialised: ready to hand to Ray Train."""

    job: SupervisedJob
    stage: str
    name: str  # registered model name, {prefix}-{suffix}
    spec: LoopSpec
    train_ds: ray.data.Dataset
    eval_ds: ray.data.Dataset
    rows: int
    inputs: list[tuple[Path, str, str, int, int]]


def prepare(job: SupervisedJob, stage: str) -> Prepared:
    """Check the tokenizer, the upstream model and the datasets, then tokenise and materialise the data.

    Everything that can be wrong with the inputs fails here, before any Ray Train worker starts.
    """
    tokenizer_dir = resolve_path(job.tokenizer)
    tok = load_tokenizer(tokenizer_dir)
    if job.model.lora is not None:
        from paddock import lora

        lora.require_peft()  # before any worker starts
    # Pinned once: the driver's checks and the workers read the same version, whatever is registered meanwhile
    pinned = tracking.model_ref(job.model.init_from) if job.model.init_from else None
    init_from = tracking.resolve_model(pinned) if pinned else None
    name = f"{job.registry_prefix}-{registry_suffix(job)}"
    if init_from is None:
        model_config = llama_config(
            job.model.shape, len(tok), job.data.seq_len, tok.bos_token_id, tok.eos_token_id
        )
    else:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(str(init_from), local_files_only=True)
        check_matches(tok, init_from)
    n_params = count_parameters(model_config, scalar=isinstance(job, RewardJob))

    connect()
    plan.check(job, stage)  # a run that cannot fit fails here, before any worker starts
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    train_ds, eval_ds, inputs = _prepare(job, tokenizer_dir, paddock_home() / "runs" / name, job.seed)
    train_ds, eval_ds = train_ds.materialize(), eval_ds.materialize()
    rows = train_ds.count()
    tc = job.train
    per_step = tc.micro_batch_size * tc.ranks * tc.grad_accum
    steps_per_epoch = rows // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{rows} training rows make no full step of {per_step} (micro_batch_size x num_workers x grad_accum)"
        )
    total = tc.max_steps or max(1, math.floor(tc.epochs * steps_per_epoch))
    spec = LoopSpec(
        objective="reward" if isinstance(job, RewardJob) else "lm",
        model=job.model,
        # The workers may be on other nodes: the upstream model as they resolve it into their own node's cache,
        # the tokenizer as bytes (nothing of the driver's disk is read there)
        init_from=actor_model(pinned) if pinned else None,
        tokenizer_files=tokenizer_files(tokenizer_dir),
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        seq_len=job.data.seq_len,
        optim=job.optim,
        train=tc,
        total_steps=total,
        n_params=n_params,
        seed=job.seed,
    )
    return Prepared(job, stage, name, spec, train_ds, eval_ds, rows, inputs)


def make_trainer(
    p: Prepared,
    run_name: str,
    callbacks: list[UserCallback] | None = None,
    spec: LoopSpec | None = None,
    reports: Queue | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a prepared stage; ``spec`` replaces the prepared one (a sweep trial's), and rank 0 puts
    every report on ``reports`` when one is given."""
    spec = spec or p.spec
    return torch_trainer(
        train_worker,
        {"spec": spec.model_dump(mode="json"), "reports": reports},
        spec.train,
        run_name,
        datasets={"train": p.train_ds, "eval": p.eval_ds},
        callbacks=callbacks,
    )


@contextmanager
def in_driver() -> Iterator[None]:
    """For the length of a local-mode run (``train.num_workers: 0``): the variables from which Ray Train's local
    controller starts a one-rank torch.distributed group for DeepSpeed (it destroys the group after the run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        release_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def release_process_group() -> None:
    """After a local-mode run that failed midway: destroy its group through DeepSpeed, which also drops the
    handles it caches on it (the next local run in this process makes a new group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    import deepspeed.comm

    if deepspeed.comm.cdb is not None:
        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def run_supervised(
    job: SupervisedJob, stage: str, callbacks: list[UserCallback] | None = None
) -> StageResult:
    """Train one supervised stage end to end and register its model as ``{prefix}-{suffix}``; one run at a time
    per output directory (``paddock.atomic.locked``). ``callbacks`` go to Ray Train's controller (its
    ``after_report`` sees every report and checkpoint)."""
    work = paddock_home() / "runs" / f"{job.registry_prefix}-{registry_suffix(job)}"
    with atomic.locked(work, stage) as lock:
        return _run_supervised(job, stage, lock, callbacks)


def _run_supervised(
    job: SupervisedJob, stage: str, lock: atomic.Lock, callbacks: list[UserCallback] | None = None
) -> StageResult:
    p = prepare(job, stage)
    tc, total = job.train, p.spec.total_steps
    tags = {"paddock.registered_name": p.name, "paddock.upstream": job.model.init_from or ""}
    with tracking.stage_run(job.experiment, stage, job.model_dump(mode="json"), tags=tags) as run:
        tracking.claim(lock, stage, run)
        for path, ds_name, context, n, bad in p.inputs:
            run.log_dataset(path, ds_name, context, n, bad)
        run.log_params(
            {"derived.total_steps": total, "derived.train_rows": p.rows, "derived.n_params": p.spec.n_params}
        )
        per_step = tc.micro_batch_size * tc.ranks * tc.grad_accum
        where = f"{tc.num_workers} workers" if tc.num_workers else "in the driver (local mode)"
        print(
            f"[{stage}] {p.rows} training rows, {total} steps of {per_step} sequences, {where}, "
            f"ZeRO-{tc.zero_stage}, {p.spec.n_params / 1e6:.1f}M parameters",
            flush=True,
        )
        queue = Queue(actor_options={"num_cpus": 0})
        out_dir = (
            resolve_path(job.output_dir) if job.output_dir else paddock_home() / "runs" / p.name / "final"
        )
        members = job.reward.ensemble if isinstance(job, RewardJob) else 1
        histories: list[list[dict[str, float]]] = []
        scored: list[Any] = []  # where ensemble_metrics reads each member
        start = time.monotonic()
        for i in range(members):
            # Member i > 0 of a reward ensemble: its own seed (score head and data mix), its metrics under
            # member<i>/, its checkpoint under members/<i> (member 0 is the directory itself)
            m = p if i == 0 else ensemble_member(p, i)
            label = stage if members == 1 else f"{stage} member {i + 1}/{members}"
            # Under a pipeline the name outlives a killed driver: Ray Train resumes a run of the same name and
            # storage from its last checkpoint (Train V2's driver fault tolerance), so a rerun loses at most
            # checkpoint_every steps, not the stage.
            name = f"{p.name}-{run.attempt_key}" + (f"-member{i}" if i else "")
            trainer = make_trainer(m, name, callbacks, reports=queue)
            history: list[dict[str, float]] = []
            with in_driver() if tc.num_workers == 0 else nullcontext():
                result = _follow(
                    trainer, queue, run, Progress(label, total), history, f"member{i}/" if i else ""
                )
            member_dir = out_dir if i == 0 else out_dir / "members" / str(i)
            with result.checkpoint.as_directory() as ckpt:
                atomic.copy_dir(Path(ckpt) / "hf", member_dir)
            if tc.num_workers == 0:  # the loop's own temporary directory, not Ray Train's storage
                shutil.rmtree(result.checkpoint.path, ignore_errors=True)
            scored.append(member_dir if tc.num_workers == 0 else result.checkpoint)
            run.log_figure(
                loss_curve(history, f"{p.name}: loss" + (f" (member {i})" if members > 1 else "")),
                "plots/loss.png" if i == 0 else f"plots/loss_member{i}.png",
            )
            histories.append(history)
        if members > 1:
            write_ensemble(out_dir, members)
            run.log_metrics(ensemble_metrics(p, scored, histories), step=total)
        run.log_metrics({"time/stage_s": time.monotonic() - start}, step=total)
        model_uri = run.log_model(
            out_dir, p.name, {"paddock.stage": stage, "paddock.upstream": job.model.init_from or ""}
        )
        history = histories[0]
        final = history[-1] if history else {}
        print(f"[{stage}] done: {model_uri}, checkpoint {out_dir}", flush=True)
        return StageResult(stage, run.run_id, out_dir, model_uri, final, history)


def ensemble_member(p: Prepared, i: int) -> Prepared:
    """Member ``i`` of a reward ensemble: the stage's data mixed again and its model's head drawn from seed
    ``job.seed + i`` (what makes the members differ), everything else as member 0's."""
    seed = p.job.seed + i
    work = paddock_home() / "runs" / p.name / f"member{i}"
    train_ds, _, _ = _prepare(p.job, resolve_path(p.job.tokenizer), work, seed)  # the test pairs take no seed
    spec = p.spec.model_copy(update={"seed": seed})
    return Prepared(p.job, p.stage, p.name, spec, train_ds.materialize(), p.eval_ds, p.rows, p.inputs)


def ensemble_batches(p: Prepared) -> list[dict[str, Any]]:
    """The test pairs an ensemble is scored on (``ensemble_metrics``): the stage's, in micro-batches."""
    from paddock.train.loop import REWARD_KEYS

    return [
        {k: b[k] for k in REWARD_KEYS}
        for b in p.eval_ds.iter_torch_batches(batch_size=p.job.train.micro_batch_size, drop_last=False)
    ]


def ensemble_metrics(
    p: Prepared, members: list[Any], histories: list[list[dict[str, float]]]
) -> dict[str, float]:
    """The registered ensemble's own eval metrics (``ensemble/eval/...``: the mean logit of every member on the
    test pairs, ``loop.ensemble_eval``), and its members' final eval accuracies, printed beside it.

    ``members``: checkpoint directories in local mode, scored in the driver (the stage's one rank); else the
    members' Ray Train checkpoints, scored in a Ray task with one worker's resources (its GPU under
    ``train.use_gpu``), which reads them from Ray Train's storage like a restarted worker, on any node.
    """
    from paddock.train.loop import ensemble_eval

    tc = p.job.train
    batches = ensemble_batches(p)
    if tc.num_workers == 0:
        got = ensemble_eval(members, batches, tc.use_gpu)
    else:
        task = ray.remote(ensemble_eval).options(
            num_cpus=tc.cpus_per_worker, num_gpus=1 if tc.use_gpu else 0, max_retries=0
        )
        got = ray.get(task.remote(members, batches, tc.use_gpu))
    own = [
        next((h["eval/accuracy"] for h in reversed(hist) if "eval/accuracy" in h), math.nan)
        for hist in histories
    ]
    print(
        f"[{p.stage}] ensemble of {len(histories)}: eval accuracy {got['eval/accuracy']:.3f} "
        f"(members {', '.join(f'{a:.3f}' for a in own)})",
        flush=True,
    )
    return {f"ensemble/{k}": v for k, v in got.items()}


def finetune_sft_job(job: FinetuneJob, dataset: Path | None, suffix: str, *extra: str) -> SFTJob:
    """The SFT stage a sampling stage fine-tunes with: its ``sft_config`` + overrides, on ``dataset`` (plus the
    job's replay dialogs), from its policy, registered as ``{prefix}-{suffix}``. With ``dataset=None`` it only
    checks the config and the replay set (call it before sampling, so that bad input fails first)."""
    overrides = list(job.sft_overrides)
    if dataset is None:
        for path in job.replay_sets:
            load_dataset(resolve_path(path), "dialogs", quarantine_dir=_replay_quarantine(job, suffix))
    else:
        if job.replay_sets and job.replay_ratio > 0:
            dataset = with_replay(job, dataset, suffix)
        overrides += [
            f"data.train={dataset}",
            f"model.init_from={job.policy}",
            *extra,
            f"registry_suffix={suffix}",
            f"registry_prefix={job.registry_prefix}",
            f"experiment={job.experiment}",
        ]
    return load_config(SFTJob, job.sft_config, overrides)


def _replay_quarantine(job: FinetuneJob, suffix: str) -> Path:
    return paddock_home() / "runs" / f"{job.registry_prefix}-{suffix}" / "quarantine"


def with_replay(job: FinetuneJob, dataset: Path, suffix: str) -> Path:
    """``dataset`` plus ``replay_ratio`` x its size of the job's replay dialogs (a seeded draw split evenly over
    the replay sets, without repeats while a set lasts), shuffled together into ``<dataset>.replay.parquet``."""
    sets = job.replay_sets
    if not sets:
        raise ValueError("with_replay needs a job with a replay dataset")
    own = pq.read_table(dataset).to_pylist()
    rng = random.Random(job.seed)
    want = round(job.replay_ratio * len(own))
    drawn: list[dict[str, Any]] = []
    for i, path in enumerate(sets):
        pool = load_dataset(resolve_path(path), "dialogs", quarantine_dir=_replay_quarantine(job, suffix))
        rows = pool.good.to_pylist()
        share = want // len(sets) + (i < want % len(sets))
        got: list[dict[str, Any]] = []
        while len(got) < share and rows:
            got += rng.sample(rows, min(len(rows), share - len(got)))
        drawn += got
    mixed = own + [
        {
            "id": f"replay-{r['id']}",
            "system": r["system"],
            "turns": r["turns"],
            "tags": [*r["tags"], "replay"],
        }
        for r in drawn
    ]
    rng.shuffle(mixed)
    out = dataset.with_suffix(".replay.parquet")
    atomic.write_parquet(pa.Table.from_pylist(mixed, schema=DIALOGS), out)
    print(
        f"[{suffix}] fine-tune data: {len(own)} new dialogs + {len(drawn)} replayed from {', '.join(sets)}",
        flush=True,
    )
    return out
