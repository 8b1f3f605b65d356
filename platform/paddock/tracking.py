"""MLflow, paddock's system of record. The only module that imports mlflow.

Embedded default: ``sqlite:///$PADDOCK_HOME/mlflow.db`` with artifacts under ``$PADDOCK_HOME/mlartifacts``;
``MLFLOW_TRACKING_URI`` points at a tracking server instead (always, on a cluster). SQLite takes one writer, so
only the driver logs: workers report to Ray Train, and the driver forwards their metrics here.

A stage is one run: its flattened config as params, metrics by step, system metrics, its input datasets with
digests, a loss-curve PNG, and its final checkpoint logged as a model and registered as
``{registry_prefix}-{name}``. A failing stage leaves its run FAILED with the error text, never RUNNING; a stopped
one (SIGTERM, which ``ray job stop`` sends, or Ctrl-C) leaves it KILLED.

A tracking server that stops answering mid-stage does not stop training: metrics wait in the stage's outbox and go
out, with their own timestamps and steps, when it answers again. Writes that need the server (params, tags,
artifacts, the model) wait for it, at most ``$PADDOCK_MLFLOW_OUTAGE_S`` seconds (default 900); past that the stage
fails, and the metrics it could not send are kept in ``$PADDOCK_HOME/unsent/<run id>.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient

from paddock.config import paddock_home

PIP_REQUIREMENTS = ["torch>=2.5", "transformers==5.24.0", "safetensors", "sentencepiece"]


DIGEST_TAG = "paddock.weights_digest"  # a model version's weights (paddock.models.checkpoint_digest)


class UpstreamModelError(ValueError):
    """A stage's upstream model (models:/ URI or path) does not exist."""


class RegistrationError(RuntimeError):
    """The weights about to be registered, or evaluated as a version, are not the ones measured or registered."""


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within ``$PADDOCK_MLFLOW_OUTAGE_S``."""


class Stopped(BaseException):
    """The job was asked to stop (SIGTERM: ``ray job stop``, a scheduler's preemption). Its runs end KILLED."""


def outage_limit_s() -> float:
    """How long a stage waits for a tracking server that stopped answering before it gives up."""
    return float(os.environ.get("PADDOCK_MLFLOW_OUTAGE_S", "900"))


def server_answers(uri: str, timeout_s: float = 2.0) -> bool:
    """Whether an ``http(s)://`` tracking server accepts a connection (a store on disk always does). A refused
    connection is told at once, where MLflow's own client would retry it for minutes."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or parsed.hostname is None:
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paddock_home() / 'mlflow.db'}"


def configure() -> MlflowClient:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # mlflow.set_*_uri also export the URI to os.environ; undo that, or every later configure() in this process
    # and every child process (Ray workers, subprocesses) would read it back and ignore a new PADDOCK_HOME.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return MlflowClient(uri, uri)


def experiment_id(name: str) -> str:
    client = configure()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (paddock_home() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def file_digest(path: Path, limit: int = 64 << 20) -> str:
    """sha256 of the file's first ``limit`` bytes and its size: cheap and stable for Parquet inputs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


class _CheckpointModel(PythonModel):
    """A logged paddock checkpoint. ``predict`` generates (causal LM) or scores (reward model) raw text."""

    def load_context(self, context: Any) -> None:
        import transformers

        path = context.artifacts["checkpoint"]
        self.tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        self.scalar = "ForSequenceClassification" in (config.architectures or [""])[0]
        cls = transformers.LlamaForSequenceClassification if self.scalar else transformers.LlamaForCausalLM
        # a reward ensemble (paddock.models.ENSEMBLE_FILE) scores with the mean of its members' logits
        manifest = Path(path) / "ensemble.json"
        members = json.loads(manifest.read_text())["members"] if self.scalar and manifest.is_file() else ["."]
        self.models = [
            cls.from_pretrained(str(Path(path) / m), use_safetensors=True, local_files_only=True).eval()
            for m in members
        ]
        self.model = self.models[0]

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list:
        import torch

        texts = list(model_input["text"]) if hasattr(model_input, "columns") else list(model_input)
        out: list[Any] = []
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor([self.tok.encode(text)])
                if self.scalar:
                    out.append(
                        sum(float(m(input_ids=ids).logits[0, 0]) for m in self.models) / len(self.models)
                    )
                else:
                    gen = self.model.generate(
                        ids, max_new_tokens=int((params or {}).get("max_new_tokens", 64)), do_sample=False
                    )
                    out.append(self.tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
        return out


class StageRun:
    """The MLflow run of one stage; every write goes through the driver."""

    RETRY_S = 5.0  # while the server is away, how often a new metric tries it again

    def __init__(self, run_id: str, client: MlflowClient, parent_run_id: str | None = None):
        self.run_id, self.client, self.parent_run_id = run_id, client, parent_run_id
        self.outbox: list[Metric] = []  # metric values the server has not taken yet, oldest first
        self.away_since: float | None = None  # monotonic time of the first unanswered send
        self.outages = 0  # how many times the server went away during this run
        self._next_try = 0.0

    @property
    def attempt_key(self) -> str:
        """What names the stage's own checkpoints (its Ray Train run): the parent run's id under a pipeline,
        which a rerun after a kill keeps, so the rerun resumes from the stage's last checkpoint; a standalone
        stage's own run id (each run its own)."""
        return (self.parent_run_id or self.run_id)[:8]

    def log_metrics(self, metrics: Mapping[str, float], step: int, send: bool = True) -> None:
        """Queue the values at ``step`` and (unless ``send`` is False: the caller sends a batch of steps at once)
        send the queue; never waits for a server that does not answer."""
        clean = {k: float(v) for k, v in metrics.items() if k != "step" and v == v}  # drop NaN
        stamp = int(time.time() * 1000)
        self.outbox.extend(Metric(k, v, stamp, step) for k, v in clean.items())
        if send:
            self.send()

    def send(self) -> bool:
        """Send the outbox (1000 values a request, MLflow's limit); False, keeping what was not sent, while the
        server does not answer. During an outage it tries again at most every ``RETRY_S`` seconds."""
        if not self.outbox:
            return True
        now = time.monotonic()
        if self.away_since is not None and now < self._next_try:
            return False
        uri = tracking_uri()
        problem = None
        if server_answers(uri):
            try:
                while self.outbox:
                    self.client.log_batch(self.run_id, metrics=self.outbox[:1000])
                    del self.outbox[:1000]
            except (MlflowException, OSError) as exc:  # requests' errors are OSErrors
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            problem = "connection refused or timed out"
        if problem is None:
            if self.away_since is not None:
                print(
                    f"[mlflow] {uri} answers again after {now - self.away_since:.0f} s; the metrics kept "
                    "meanwhile are sent",
                    flush=True,
                )
                self.away_since = None
            return True
        if self.away_since is None:
            self.away_since, self.outages = now, self.outages + 1
            print(
                f"[mlflow] {uri} does not answer ({problem}); training goes on and its metrics wait here until "
                "the server is back",
                flush=True,
            )
        self._next_try = now + self.RETRY_S
        return False

    def wait_for_server(self, doing: str) -> None:
        """Send the outbox, waiting for the server at most ``outage_limit_s()``: what comes next (``doing``)
        needs it. Past the limit the outbox goes to ``$PADDOCK_HOME/unsent/<run id>.jsonl`` and
        ``TrackingUnavailable`` says so."""
        deadline = time.monotonic() + outage_limit_s()
        while not self.send():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingUnavailable(
                    f"the MLflow server at {tracking_uri()} has not answered for {outage_limit_s():.0f} s "
                    f"(PADDOCK_MLFLOW_OUTAGE_S), so {doing} cannot go on; the {len(self.outbox)} metric values "
                    f"it missed are kept in {self.keep_unsent()}"
                )
            time.sleep(min(self.RETRY_S, left))

    def keep_unsent(self) -> Path:
        """Move the outbox to ``$PADDOCK_HOME/unsent/<run id>.jsonl`` (one metric value a line)."""
        path = paddock_home() / "unsent" / f"{self.run_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for m in self.outbox:
                f.write(
                    json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step})
                )
                f.write("\n")
        self.outbox.clear()
        return path

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.wait_for_server("logging params")
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()}, run_id=self.run_id)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.wait_for_server("tagging the run")
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_dataset(self, path: Path, name: str, context: str, rows: int, bad_rows: int = 0) -> None:
        self.wait_for_server("logging an input dataset")
        source = resolve_dataset_source(str(path))
        dataset = MetaDataset(source=source, name=name, digest=file_digest(path))  # type: ignore[abstract]
        mlflow.log_input(dataset, context=context, tags={"rows": str(rows), "bad_rows": str(bad_rows)})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.wait_for_server(f"logging {artifact_file}")
        mlflow.log_figure(figure, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.wait_for_server(f"logging {path.name}")
        mlflow.log_artifact(str(path), artifact_path)

    def log_model(
        self,
        checkpoint_dir: Path,
        registered_name: str,
        tags: Mapping[str, str] | None = None,
        measured_digest: str | None = None,
    ) -> str:
        """Log the checkpoint as a model, register it, and return ``models:/{name}/{version}``.

        The version is tagged with its weights' digest (``paddock.weights_digest``). ``measured_digest`` is the
        digest of the weights the stage's metrics were measured on: a checkpoint holding other weights fails
        with ``RegistrationError`` before anything is logged."""
        from paddock.models import checkpoint_digest

        self.wait_for_server(f"registering {registered_name}")
        digest = checkpoint_digest(checkpoint_dir)
        if measured_digest is not None and digest != measured_digest:
            raise RegistrationError(
                f"not registering {registered_name}: {checkpoint_dir} holds weights with digest {digest}, but "
                f"the metrics of run {self.run_id} were measured on weights with digest {measured_digest}"
            )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=_CheckpointModel(),
            artifacts={"checkpoint": str(checkpoint_dir)},
            registered_model_name=registered_name,
            pip_requirements=PIP_REQUIREMENTS,
        )
        version = str(info.registered_model_version)
        for k, v in (tags or {}).items():
            self.client.set_model_version_tag(registered_name, version, k, v)
        self.client.set_model_version_tag(registered_name, version, "paddock.run_id", self.run_id)
        self.client.set_model_version_tag(registered_name, version, DIGEST_TAG, digest)
        return f"models:/{registered_name}/{version}"


@contextmanager
def stage_run(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    nested: bool = False,
) -> Iterator[StageRun]:
    """An MLflow run around a stage. On any exception the run ends FAILED with the error text attached (KILLED
    when the job was stopped), its unsent metrics kept on disk when the server is away."""
    client = configure()
    exp = experiment_id(experiment)
    parent = mlflow.active_run()
    run = mlflow.start_run(
        experiment_id=exp,
        run_name=run_name,
        nested=nested or mlflow.active_run() is not None,  # inside the pipeline's parent run
        log_system_metrics=True,
        tags={"paddock.stage": run_name, **(tags or {})},
    )
    handle = StageRun(run.info.run_id, client, parent.info.run_id if parent is not None else None)
    try:
        handle.log_params(flatten(params))
        yield handle
        handle.wait_for_server("ending the run")
    except BaseException as exc:
        if handle.outbox and not handle.send():
            print(f"[mlflow] metrics not sent are kept in {handle.keep_unsent()}", flush=True)
        _end_failed(exc, text=True)
        raise
    mlflow.end_run(status="FINISHED")


def _end_failed(exc: BaseException, text: bool = False) -> None:
    """End the active run KILLED (the job was stopped) or FAILED, with the error as a tag; a server that does not
    answer loses the tag, never the error that is on its way up."""
    # SystemExit too: the SIGTERM handler ray.init() installs in a driver exits the process (paddock never does)
    stopped = isinstance(exc, (Stopped, KeyboardInterrupt, SystemExit))
    if not server_answers(tracking_uri()):  # MLflow's client would retry for minutes
        print(
            "[mlflow] could not end the run: the server does not answer; the stage's next start closes it",
            flush=True,
        )
        return
    try:
        mlflow.set_tag("paddock.error", f"{type(exc).__name__}: {exc}"[:5000])
        if text:
            mlflow.log_text("".join(traceback.format_exception(exc)), "error.txt")
        mlflow.end_run(status="KILLED" if stopped else "FAILED")
    except Exception as problem:  # the server is away: the run stays RUNNING until the next start closes it
        print(f"[mlflow] could not end the run: {type(problem).__name__}: {str(problem)[:200]}", flush=True)


def claim(lock: Any, what: str, run: StageRun) -> None:
    """Note ``run`` as the holder of ``lock`` (``paddock.atomic.Lock``). A run that the previous holder left
    RUNNING (its process was killed: the kernel freed its lock) is marked KILLED first."""
    found = re.search(r"MLflow run ([0-9a-f]{32})", lock.previous)
    if found and found.group(1) != run.run_id:
        try:
            stale = run.client.get_run(found.group(1))
        except MlflowException:
            stale = None
        if stale is not None and stale.info.status == "RUNNING":
            _mark_killed(run.client, stale, f"its {what} process died during the run", what)
    lock.note(f"{what}, MLflow run {run.run_id}")


def _mark_killed(client: MlflowClient, run: Any, why: str, who: str) -> None:
    """Close a run that a killed process left RUNNING: KILLED, with ``why`` as its error."""
    client.set_tag(run.info.run_id, "paddock.error", why)
    client.set_terminated(run.info.run_id, status="KILLED")
    print(f"[{who}] marked the interrupted run {run.info.run_name or run.info.run_id} KILLED", flush=True)


# --------------------------------------------------------------------------------------------------
# Upstream models


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, None
    if "/" in body:
        name, version = body.rsplit("/", 1)
        return name, None, version
    return body, "latest", None


def model_version(uri: str) -> tuple[str, str]:
    """(name, version) that a ``models:/`` URI names; ``@latest`` or ``/latest`` is the newest version."""
    client = configure()
    name, alias, version = _parse_models_uri(uri)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise UpstreamModelError(f"upstream model {uri}: {exc}") from exc
    if not versions:
        raise UpstreamModelError(
            f"upstream model {uri} does not exist: no registered model named '{name}' in {tracking_uri()}; "
            "run the stage that registers it first"
        )
    if alias in ("latest", None) and version in ("latest", None):
        return name, str(max(int(v.version) for v in versions))
    if alias is not None:
        try:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            raise UpstreamModelError(f"upstream model {uri}: '{name}' has no alias '{alias}'") from exc
    if str(version) not in {str(v.version) for v in versions}:
        raise UpstreamModelError(f"upstream model {uri}: '{name}' has no version {version}")
    return name, str(version)


def model_ref(uri_or_path: str) -> str:
    """What a driver hands to actors on other nodes: a ``models:/`` URI pinned to its version now (an alias or
    ``latest`` could move before every actor resolved it), or an absolute path (which then must exist on every
    node: a shared filesystem). Each actor resolves it with ``resolve_model`` on its own node."""
    if uri_or_path.startswith("models:/"):
        name, version = model_version(uri_or_path)
        return f"models:/{name}/{version}"
    return str(resolve_model(uri_or_path))


def resolve_model(uri_or_path: str) -> Path:
    """A local checkpoint directory for a ``models:/`` URI (downloaded once into this node's model cache,
    ``$PADDOCK_HOME/models``) or a path."""
    if not uri_or_path.startswith("models:/"):
        path = Path(uri_or_path).expanduser()
        if not path.is_absolute():
            path = paddock_home() / path
        if not path.is_dir():
            raise UpstreamModelError(f"upstream model {uri_or_path}: no such directory {path}")
        return path
    name, version = model_version(uri_or_path)
    cache = paddock_home() / "models" / name / f"v{version}"
    checkpoint = _logged_checkpoint(cache)
    if checkpoint is None:
        _download(f"models:/{name}/{version}", cache)
        checkpoint = _logged_checkpoint(cache)
    if checkpoint is None:
        raise UpstreamModelError(
            f"upstream model {uri_or_path}: version {version} carries no checkpoint artifact"
        )
    return checkpoint


def _download(uri: str, cache: Path) -> None:
    """Download a model version beside ``cache`` and rename it into place whole: a reader never sees a partial
    download, and of two processes resolving the same version, the second to finish keeps the first's copy."""
    if _logged_checkpoint(cache) is not None:  # another process renamed its whole copy in meanwhile
        return
    if cache.exists():  # a cache directory without a whole model in it: an interrupted download of old
        shutil.rmtree(cache, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
        try:
            tmp.rename(cache)
        except OSError:
            if _logged_checkpoint(cache) is None:  # not another process's whole copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _logged_checkpoint(model_dir: Path) -> Path | None:
    """The checkpoint directory inside a downloaded paddock model, as its MLmodel file records it."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        meta = yaml.safe_load(mlmodel.read_text())
    except yaml.YAMLError:
        return None
    if not isinstance(meta, dict):  # a half-written file
        return None
    rel = (
        meta.get("flavors", {})
        .get("python_function", {})
        .get("artifacts", {})
        .get("checkpoint", {})
        .get("path")
    )
    path = model_dir / rel if rel else None
    return path if path is not None and (path / "config.json").is_file() else None


# --------------------------------------------------------------------------------------------------
# Promotion: champion aliases, version metrics, the promotion record

CHAMPION, PREVIOUS = "champion", "previous-champion"
PROMOTIONS_EXPERIMENT = "paddock-promotions"


def version_metrics(name: str, version: str) -> dict[str, float]:
    """The metrics of the run that logged ``name`` version ``version`` (its evaluations included)."""
    client = configure()
    mv = client.get_model_version(name, version)
    if not mv.run_id:
        return {}
    return dict(client.get_run(mv.run_id).data.metrics)


def alias_version(name: str, alias: str) -> str | None:
    try:
        return str(configure().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    configure().set_registered_model_alias(name, alias, version)


def record_promotion(
    name: str, version: str, previous: str | None, action: str, forced: bool, checks: Mapping[str, Any]
) -> str:
    """A run in the ``paddock-promotions`` experiment, and tags on the promoted version. Returns the run id."""
    client = configure()
    exp = experiment_id(PROMOTIONS_EXPERIMENT)
    run = client.create_run(
        exp,
        run_name=f"{action} {name} v{version}",
        tags={
            "paddock.model": name,
            "paddock.version": version,
            "paddock.previous_champion": previous or "",
            "paddock.action": action,
            "paddock.forced": str(forced).lower(),
        },
    )
    for key, value in checks.items():
        client.log_param(run.info.run_id, key[:250], str(value)[:6000])
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_model_version_tag(name, version, "paddock.promoted_by_run", run.info.run_id)
    if forced:
        client.set_model_version_tag(name, version, "paddock.forced_promotion", "true")
    return run.info.run_id


def last_promoted_model() -> str | None:
    """The registered name of the most recent promotion (or rollback), if any."""
    client = configure()
    exp = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.tags.get("paddock.model") if runs else None


def log_version_metrics(
    name: str, version: str, metrics: Mapping[str, float], digest: str | None = None
) -> None:
    """Log evaluation metrics on the run that logged ``name`` version ``version`` (what promotion gates read).

    Each goes one step past the last step of the same metric in that run, so it is the latest value. ``digest``
    is that of the weights evaluated: unless it is the version's own, nothing is logged (``RegistrationError``).
    """
    client = configure()
    mv = client.get_model_version(name, version)
    registered = mv.tags.get(DIGEST_TAG)
    if digest is not None and registered is not None and digest != registered:
        raise RegistrationError(
            f"{name} v{version} holds weights with digest {registered}, but the evaluation was of weights with "
            f"digest {digest}; its metrics are not logged"
        )
    run_id = mv.run_id
    if not run_id:
        raise UpstreamModelError(f"{name} v{version} was not logged by a run; nowhere to put its evaluation")
    logged = client.get_run(run_id).data.metrics
    step = 1 + max(
        (m.step for key in metrics if key in logged for m in client.get_metric_history(run_id, key)),
        default=0,
    )
    clean = {k: float(v) for k, v in metrics.items() if v == v}
    mlflow.log_metrics(clean, step=step, run_id=run_id)
    client.set_model_version_tag(name, version, "paddock.evaluated", "true")
    if digest is not None:
        client.set_model_version_tag(name, version, "paddock.evaluated_digest", digest)


def tag_run(run_id: str, tags: Mapping[str, str]) -> None:
    client = configure()
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


@contextmanager
def _ending(run: Any) -> Iterator[str]:
    """Ends the active run ``run`` FINISHED, or FAILED with the error's text as a tag."""
    try:
        yield run.info.run_id
    except BaseException as exc:
        _end_failed(exc)
        raise
    mlflow.end_run(status="FINISHED")


@contextmanager
def parent_run(experiment: str, name: str, run_id: str | None = None) -> Iterator[str]:
    """The pipeline's parent run (resumed when ``run_id`` is given): every stage run inside it is nested."""
    configure()
    exp = experiment_id(experiment)
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id)
        # A killed attempt leaves its stage run RUNNING for ever: close it as KILLED, with a tag saying why.
        client = mlflow.MlflowClient()
        parents = [run_id]
        while parents:  # its stage runs, and those nested in a round's run
            parent = parents.pop()
            for child in client.search_runs(
                [run.info.experiment_id],
                f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'",
            ):
                if child.data.tags.get("paddock.stage") == "round":
                    parents.append(child.info.run_id)
                    continue  # resumed by the pipeline, by its id
                _mark_killed(client, child, "the pipeline driver died during this stage", "pipeline")
    else:
        run = mlflow.start_run(experiment_id=exp, run_name=name, tags={"paddock.stage": name})
    with _ending(run) as run_id:
        yield run_id


@contextmanager
def round_run(experiment: str, round_: int, run_id: str | None = None) -> Iterator[str]:
    """A preference round's run inside the pipeline's parent run (resumed when ``run_id`` is given): the round's
    stage runs nest under it."""
    configure()
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=True)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id(experiment),
            run_name=f"round-{round_}",
            nested=True,
            tags={"paddock.stage": "round", "paddock.round": str(round_)},
        )
    with _ending(run) as run_id:
        yield run_id


def log_artifacts(run_id: str, directory: Path, artifact_path: str | None = None) -> None:
    configure().log_artifacts(run_id, str(directory), artifact_path)


def describe_version(name: str, version: str, text: str) -> None:
    """The registry description of a model version (its model card)."""
    configure().update_model_version(name, version, description=text)


def version_digest(name: str, version: str) -> str | None:
    """The weights digest a model version was registered with (None for versions older than the tag)."""
    return configure().get_model_version(name, version).tags.get(DIGEST_TAG)


def version_run(name: str, version: str) -> tuple[str, dict[str, str], dict[str, float]]:
    """(run id, params, metrics) of the run that logged a model version."""
    client = configure()
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        raise UpstreamModelError(f"{name} v{version} was not logged by a run")
    run = client.get_run(run_id)
    return run_id, dict(run.data.params), dict(run.data.metrics)
