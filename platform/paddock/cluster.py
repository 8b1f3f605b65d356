"""Connect to Ray: the cluster named by RAY_ADDRESS when set, else an embedded local instance.

On a laptop the embedded instance advertises more logical CPUs than the machine has (at least 4), so that
Ray Data's tokenisation, Serve and the training workers (which request fractional CPUs) never wait on each
other; the OS still shares the real cores. On a cluster nothing is overridden.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import ray

EMBEDDED_MIN_CPUS = 4


def connect(num_cpus: int | None = None) -> dict:
    """``ray.init`` once per process; returns the cluster's resources."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            # Ray Train passes this to its controller and workers; a laptop is never preempted, so the preemption
            # watcher (one more actor process per training run) has nothing to watch. A value already set wins.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            cpus = num_cpus or max(EMBEDDED_MIN_CPUS, os.cpu_count() or 1)
            ray.init(
                num_cpus=cpus,
                include_dashboard=False,
                log_to_driver=True,
                runtime_env={
                    "env_vars": WORKER_ENV,
                    "worker_process_setup_hook": "paddock.cluster.quiet_worker_logs",
                },
            )
    quiet_data()
    return ray.cluster_resources()


# paddock reports progress itself; Ray Data's per-operator bars from every worker would drown it.
# RAY_DATA_DISABLE_PROGRESS_BARS=0 brings them back.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "1"),
}


# Without the dashboard (embedded runs skip it) the State API is absent, and Ray Train's placement-group cleaner
# warns about it every few seconds while a run lasts; nothing is wrong, so embedded workers keep it quiet.
NOISY_WORKER_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Runs in every worker process of an embedded instance (``worker_process_setup_hook``)."""
    for name in NOISY_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if WORKER_ENV["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1":
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        # Without bars Ray Data logs progress at INFO every 10 s instead: keep its warnings only.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


def actor_device() -> Any:
    """The GPU Ray gave this actor or Serve replica (``num_gpus``), else the CPU: where its model and inputs go."""
    import torch

    # Outside Ray (a replica class driven in-process) ray.get_gpu_ids() would start a local Ray instance.
    given = ray.is_initialized() and ray.get_gpu_ids()
    return torch.device("cuda") if given and torch.cuda.is_available() else torch.device("cpu")


class ActorTimeout(RuntimeError):
    """Actors did not answer a call within the stage's ``actor_timeout_s``."""


class ActorLost(RuntimeError):
    """An actor that holds state the run cannot rebuild (PPO's policy hub or rollout buffer) died."""


def ask(name: str, call: Any, timeout_s: float, doing: str) -> Any:
    """``gather`` of one call on an actor that holds a run's state: its death raises ``ActorLost`` naming it."""
    import ray

    try:
        return gather({name: call}, timeout_s, doing)[0]
    except ray.exceptions.RayActorError as exc:
        raise ActorLost(
            f"{doing}: {name} died ({type(exc).__name__}); what it held cannot be rebuilt in this run, so the "
            "stage stops here"
        ) from exc


def gather(calls: Mapping[str, Any], timeout_s: float, doing: str) -> list[Any]:
    """``ray.get`` of named calls (name -> ObjectRef) with one deadline for all; on timeout, ``ActorTimeout``
    naming the actors that had not answered and what they were doing. Results in the order of ``calls``."""
    names, refs = list(calls), list(calls.values())
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [n for n, r in zip(names, refs, strict=True) if r in pending]
        raise ActorTimeout(
            f"{doing}: no answer from {', '.join(late)} within {timeout_s:g} s (actor_timeout_s); "
            "a hung or overloaded actor, or raise actor_timeout_s for slower hardware"
        )
    return ray.get(refs)


# --------------------------------------------------------------------------------------------------
# Models and directories between the driver and actors on other nodes


def one_node() -> bool:
    """Whether the connected Ray cluster is this machine alone (its actors read the driver's disk)."""
    return sum(1 for node in ray.nodes() if node.get("Alive")) <= 1


def actor_model(uri_or_path: str) -> str:
    """A model as actors anywhere in the cluster open it (``rollout.actors.local_checkpoint``): on one node the
    driver's own checkpoint directory; on several, a registry URI pinned to its version now
    (``tracking.model_ref``), which each actor resolves through MLflow into its own node's model cache."""
    from paddock import tracking

    if one_node():
        return str(tracking.resolve_model(uri_or_path))
    return tracking.model_ref(uri_or_path)


# Nodes share nothing but the configured storage and MLflow: an actor that writes a checkpoint for the driver (a
# rollout worker saving the evaluated policy) writes it to $PADDOCK_STORAGE, a path every node mounts or a
# pyarrow.fs URI (s3://, gs://), and the driver copies it into its own PADDOCK_HOME. Without PADDOCK_STORAGE
# there is one node (or PADDOCK_HOME is shared) and the actor writes where the driver reads.


def handoff_dir(run_id: str, name: str) -> str | None:
    """Where an actor leaves directory ``name`` for the driver of run ``run_id``; None without
    ``$PADDOCK_STORAGE`` (write straight into the driver's path)."""
    storage = os.environ.get("PADDOCK_STORAGE")
    if not storage:
        return None
    return f"{storage.rstrip('/')}/paddock-handoff/{run_id[:8]}/{name}"


def is_uri(location: str) -> bool:
    return "://" in location


def put_dir(local: str, dest: str) -> None:
    """Copy a local directory to ``dest`` (a path or a pyarrow.fs URI) whole."""
    import pyarrow.fs

    pyarrow.fs.copy_files(local, dest)


def fetch_dir(src: str, dst: Any) -> None:
    """``dst`` (a local path) becomes a copy of ``src`` (a path or a pyarrow.fs URI) in one rename, and ``src`` is
    removed: a handoff is read once."""
    import pyarrow.fs

    from paddock import atomic

    with atomic.writing_dir(dst) as tmp:
        pyarrow.fs.copy_files(src, str(tmp))
    fs, path = pyarrow.fs.FileSystem.from_uri(src if is_uri(src) else os.path.abspath(src))
    fs.delete_dir(path)
