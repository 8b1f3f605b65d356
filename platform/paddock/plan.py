"""The capacity planner: every role of a stage, its device and host memory, and whether a cluster holds them.

A stage's processes play roles (learner ranks, rollout workers, scorers, Serve replicas, the driver). For each role
the planner computes, from the config and the model shapes alone (nothing is loaded):

- **model states of a learner rank** (bytes; N parameters, d data-parallel ranks, P the largest layer's
  parameters), mixed-precision AdamW as DeepSpeed estimates it (``deepspeed.runtime.zero``:
  ``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_model_states_mem_needs``, whose 18 bytes a
  parameter are 16-bit gradients 2, fp32 gradients 4, fp32 master weights 4, Adam moments 8): ZeRO-3
  ``4P + 18N/d``; ZeRO-2 ``2N + 18N/d``; ZeRO-1 ``4N + 16N/d``; ZeRO-0 ``20N``. With ``train.offload`` the
  optimiser's share (16N/d) moves to the host. fp32 training (CPU) keeps no 16-bit copy: 16 bytes a parameter
  (weights, gradients, two moments), partitioned the same way. Host memory of a rank below ZeRO-3: the whole
  model loaded in fp32 before DeepSpeed takes it, times DeepSpeed's buffer factor 1.5: ``6N``; under ZeRO-3 the
  model is created partitioned and the checkpoint read one module at a time (``paddock.train.engine``): ``4P``.
- **activations of a micro-batch** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", eq. 1, no tensor parallelism): ``s·b·h·(34 + 5·a·s/h)`` bytes a layer at 16 bits; the
  ``5as/h`` attention-score term is dropped with memory-efficient attention (sdpa, flash); with gradient
  checkpointing a layer keeps only its 16-bit input (``2sbh``) and one layer is recomputed at a time. The loss
  adds the logits: ``s·b·V`` in the compute dtype plus three fp32 copies (upcast, log-softmax, its gradient).
- **inference copies**: weights ``N`` × the inference dtype's bytes; a forward micro-batch of ``T`` tokens (the
  token budget) holds per layer ``T·(4h + 3f)`` activation elements and one chunk of fp32 logits
  (``chunk·V·4``: log-probs are computed chunk by chunk); generation adds the KV cache of the micro-batch,
  ``T · 2·L·kv_heads·head_dim`` elements. A vLLM rollout copy spread over ``n`` GPUs
  (``inference.vllm.tensor_parallel``) holds ``1/n`` of all three on each, its process taking ``n`` GPUs of one
  node. Host memory of an inference copy on a GPU: its weights, loaded on the host first; a vLLM rollout worker
  keeps that copy as its host mirror (one ``N``, not two); on a CPU vLLM's own copy is host memory too, the mirror
  beside it.

A role fits when its device memory is within ``USABLE`` of one GPU of a node type that still has enough GPUs
left (roles are placed largest first, on the smallest GPUs that hold them), and its processes' host memory is
within ``USABLE`` of that node's. Node types carry their GPU and host memory as Ray node labels in the cluster
file (``paddock.io/gpu-memory-gib``, ``paddock.io/host-memory-gib``). A role that does not fit names the missing
GiB and the config keys that would change it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

GIB = 1 << 30
USABLE = 0.9  # share of a GPU's or a node's memory a plan may fill (CUDA context, allocator slack, the OS)
DRIVER_HOST_GIB = 4.0  # a stage's driver without any model: Ray, MLflow, datasets of prompts
LABEL_GPU = "paddock.io/gpu-memory-gib"
LABEL_HOST = "paddock.io/host-memory-gib"


class PlanError(ValueError):
    """A stage that cannot run on its cluster: the roles that do not fit, why, and what to change."""


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: parameters, the largest layer's, and the activation dimensions."""

    params: int
    largest_layer: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    members: int = 1  # a reward ensemble's models, each of ``params`` (paddock.models.RewardEnsemble)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def of(cls, config: LlamaConfig, scalar: bool = False) -> ModelShape:
        h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
        kv = config.num_key_value_heads or config.num_attention_heads
        head_dim = h // config.num_attention_heads
        layer = h * h * 2 + 2 * h * kv * head_dim + 3 * h * f + 2 * h  # q, o, k, v, gate/up/down, two norms
        embed = v * h
        head = h if scalar else (0 if config.tie_word_embeddings else v * h)
        return cls(
            params=config.num_hidden_layers * layer + embed + head + h,
            largest_layer=max(layer, embed),
            layers=config.num_hidden_layers,
            hidden=h,
            ffn=f,
            heads=config.num_attention_heads,
            kv_heads=kv,
            vocab=v,
        )

    @classmethod
    def named(cls, shape: str, scalar: bool = False) -> ModelShape:
        from paddock.models import llama_config

        return cls.of(llama_config(shape), scalar)

    @classmethod
    def from_checkpoint(cls, path: str | Path, scalar: bool = False) -> ModelShape:
        from paddock.models import ensemble_members

        config = json.loads((Path(path) / "config.json").read_text())
        shape = cls.of(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}), scalar)
        return replace(shape, members=len(ensemble_members(path))) if scalar else shape


def dtype_bytes(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


# --------------------------------------------------------------------------------------------------
# Memory formulas (see the module docstring)


def model_states_bytes(
    n: int, largest: int, zero_stage: int, ranks: int, *, mixed: bool = True, offload: bool = False
) -> tuple[float, float]:
    """(device, host) bytes of one rank's model states: weights, gradients, optimiser; DeepSpeed's formulas."""
    d = max(1, ranks)
    if not mixed:  # fp32 weights 4, gradients 4, Adam moments 8
        device = {0: 16 * n, 1: 8 * n + 8 * n / d, 2: 4 * n + 12 * n / d, 3: 4 * largest + 16 * n / d}[
            zero_stage
        ]
        return device, 0.0
    optimiser = 16 * n / d  # fp32 gradients, master weights and moments, partitioned from ZeRO-1 on
    if zero_stage == 3:
        device = 4 * largest + (2 * n / d if offload else 18 * n / d)
    elif zero_stage == 2:
        device = 2 * n + (0 if offload else 18 * n / d)
    elif zero_stage == 1:
        device = 4 * n + (0 if offload else optimiser)
    else:
        device = 20 * n
    return device, (optimiser * 1.5 if offload else 0.0)


def activation_bytes(
    shape: ModelShape,
    tokens_per_sequence: int,
    micro_batch: int,
    *,
    bytes_per_value: int,
    checkpointing: bool,
    flash: bool = True,
    logits_tokens: int | None = None,
) -> float:
    """Bytes kept for the backward pass of one micro-batch, the loss's logits included."""
    s, b, h, a = tokens_per_sequence, micro_batch, shape.hidden, shape.heads
    scale = bytes_per_value / 2  # the formula counts 16-bit values
    per_layer = s * b * h * (34 + (0 if flash else 5 * a * s / h)) * scale
    kept = shape.layers * 2 * s * b * h * scale + per_layer if checkpointing else shape.layers * per_layer
    logit_rows = b * (s if logits_tokens is None else logits_tokens)
    return kept + logit_rows * shape.vocab * (bytes_per_value + 12)


def forward_bytes(
    shape: ModelShape,
    tokens: int,
    bytes_per_value: int,
    logits_chunk: int = 1024,
    *,
    flash: bool = True,
    seq_len: int = 4096,
) -> float:
    """Transient bytes of an inference forward pass over ``tokens`` (one micro-batch under the token budget); without
    a memory-efficient attention kernel (the CPU's), one layer's attention scores, ``heads x rows x seq_len^2``."""
    hidden = tokens * (4 * shape.hidden + 3 * shape.ffn) * bytes_per_value
    scores = 0 if flash else shape.heads * tokens * min(seq_len, tokens) * 4
    return hidden + scores + min(tokens, logits_chunk) * shape.vocab * 4


def kv_cache_bytes(shape: ModelShape, tokens: int, bytes_per_value: int) -> float:
    return tokens * 2 * shape.layers * shape.kv_heads * shape.head_dim * bytes_per_value


# --------------------------------------------------------------------------------------------------
# Roles


@dataclass
class Role:
    role: str
    count: int
    gpus_per_process: float
    device_gib: float
    host_gib: float
    keys: list[str] = field(default_factory=list)  # config keys that change this role's memory
    fits: bool = True
    reason: str = ""
    node_type: str | None = None
    needs: str | None = None  # a capability paddock lacks for this role
    weights_gib: float = 0.0  # an inference copy's weights alone (on each of its GPUs)
    spread: str = ""  # the setting that spreads this copy over GPUs (tensor parallelism), where one exists
    phase: str = ""  # roles of one phase run at the same time

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            k: d[k] for k in ("role", "count", "gpus_per_process", "device_gib", "host_gib", "fits", "reason")
        }


@dataclass
class Plan:
    stage: str
    roles: list[Role]
    cluster: str | None = None

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.roles)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "cluster": self.cluster,
            "fits": self.fits,
            "roles": [r.row() for r in self.roles],
        }

    def table(self) -> str:
        head = f"{'role':<40} {'count':>5} {'GPU/proc':>8} {'device GiB':>10} {'host GiB':>9}  verdict"
        lines = [
            f"plan of {self.stage}" + (f" on {self.cluster}" if self.cluster else ""),
            head,
            "-" * len(head),
        ]
        for r in self.roles:
            verdict = ("fits" if r.fits else "DOES NOT FIT") + (f": {r.reason}" if r.reason else "")
            lines.append(
                f"{r.role:<40} {r.count:>5} {r.gpus_per_process:>8g} {r.device_gib:>10.1f} {r.host_gib:>9.1f}  {verdict}"
            )
        lines.append("verdict: " + ("fits" if self.fits else "does not fit"))
        return "\n".join(lines)

    def refuse(self) -> None:
        """Raise ``PlanError`` naming every role that does not fit."""
        if not self.fits:
            bad = [r for r in self.roles if not r.fits]
            raise PlanError(
                f"{self.stage} does not fit"
                + (f" on {self.cluster}" if self.cluster else "")
                + ":\n  "
                + "\n  ".join(f"{r.role}: {r.reason}" for r in bad)
                + "\n(--set plan.check=false skips this check)"
            )


def _gib(x: float) -> float:
    return round(x / GIB, 2)


def learner_role(
    name: str,
    models: Sequence[ModelShape],
    train: Any,
    tokens_per_sequence: int,
    *,
    logits_tokens: int | None = None,
    keys_prefix: str = "train",
) -> Role:
    """Ray Train ranks holding ``models`` (PPO's learners hold policy and value) under DeepSpeed."""
    mixed = train.use_gpu and train.precision != "fp32"
    bpv = 2 if mixed else 4
    ckpt = gradient_checkpointing(train, models[0])
    device = host = 0.0
    for i, m in enumerate(models):
        dev, off = model_states_bytes(
            m.params, m.largest_layer, train.zero_stage, train.ranks, mixed=mixed, offload=train.offload
        )
        device += dev
        # ZeRO-3 creates the model partitioned and loads the checkpoint one module at a time (engine.partitioned);
        # below stage 3 every rank loads it whole in fp32 before DeepSpeed takes it.
        host += off + (4 * m.largest_layer if train.zero_stage == 3 else 6 * m.params)
        lt = logits_tokens if i == 0 else 0  # a value model's head is a scalar
        device += activation_bytes(  # the CPU's attention materialises the scores; GPUs use sdpa / flash
            m if i == 0 else _scalar(m),
            tokens_per_sequence,
            train.micro_batch_size,
            bytes_per_value=bpv,
            checkpointing=ckpt,
            flash=train.use_gpu,
            logits_tokens=lt,
        )
    if not train.use_gpu:  # on CPU the "device" is the host
        host, device = host + device, 0.0
    return Role(
        name,
        train.ranks,
        train.gpus_per_worker if train.use_gpu else 0.0,
        _gib(device),
        _gib(host),
        keys=[
            f"{keys_prefix}.{k}"
            for k in ("num_workers", "zero_stage", "offload", "micro_batch_size", "gradient_checkpointing")
        ],
    )


def _scalar(m: ModelShape) -> ModelShape:
    return ModelShape(m.params, m.largest_layer, m.layers, m.hidden, m.ffn, m.heads, m.kv_heads, 1)


def gradient_checkpointing(train: Any, shape: ModelShape) -> bool:
    flag = getattr(train, "gradient_checkpointing", None)
    return shape.params >= 1e9 if flag is None else bool(flag)


def inference_role(
    name: str,
    count: int,
    gpus: float,
    shape: ModelShape,
    dtype: str,
    token_budget: int,
    *,
    generates: bool,
    keys: Iterable[str],
    seq_len: int = 4096,
) -> Role:
    """An inference copy (rollout worker, scorer, replica): weights, one micro-batch's forward, KV cache."""
    bpv = dtype_bytes(dtype)
    weights = shape.params * shape.members * bpv  # an ensemble's members all held, run one after another
    total = weights + forward_bytes(shape, token_budget, bpv, flash=gpus > 0, seq_len=seq_len)
    if generates:
        total += kv_cache_bytes(shape, token_budget, bpv)
    on_gpu = gpus > 0
    return Role(
        name,
        count,
        gpus,
        _gib(total) if on_gpu else 0.0,
        # loaded on the host in the inference dtype first; on CPU the host is the device
        _gib(weights + (0 if on_gpu else total - weights)),
        keys=list(keys),
        weights_gib=_gib(weights),
    )


def together(name: str, roles: list[Role], keys: Iterable[str]) -> Role:
    """Inference copies in one process (``ppo.placement: colocated``), taking turns: their weights add up, their
    working memory is the largest one's, and the process holds their GPU shares together, one GPU at most (it
    uses one device)."""
    gpus = min(1.0, sum(r.gpus_per_process for r in roles))
    weights = sum(r.weights_gib for r in roles)
    if gpus > 0:
        device = weights + max(r.device_gib - r.weights_gib for r in roles)
        host = max(r.host_gib for r in roles)  # each is loaded on the host, then moved to the device
    else:
        device, host = 0.0, weights + max(r.host_gib - r.weights_gib for r in roles)
    all_keys = list(dict.fromkeys([*keys, *(k for r in roles for k in r.keys)]))
    return Role(name, 1, gpus, device, host, keys=all_keys, weights_gib=weights)


def taking_turns(learner: Role, worker: Role, *, sleeps: bool, offloads: bool, host_copy: bool) -> Role:
    """A learner rank and a rollout worker on one GPU (``ppo.placement: colocated`` on GPUs), taking turns: the
    engine samples while the learner rests, the learner trains while the engine sleeps. The device holds the
    larger of the two turns and of the weight stream between them (the learner awake, the engine's weights back,
    its KV cache not yet): what does not rest (``offloads`` false) or sleep (``sleeps`` false) stays through the
    other's turn. The host holds both processes, the learner's offloaded states, and the engine's model where it
    sleeps by moving to the host (``host_copy``: the transformers engine; vLLM's deepest sleep keeps nothing)."""
    sampling = worker.device_gib + (0.0 if offloads else learner.device_gib)
    training = learner.device_gib + (0.0 if sleeps else worker.device_gib)
    streaming = learner.device_gib + (worker.weights_gib if sleeps else worker.device_gib)
    host = learner.host_gib + worker.host_gib
    host += (learner.device_gib if offloads else 0.0) + (worker.weights_gib if sleeps and host_copy else 0.0)
    keys = ["train.gpus_per_worker", "ppo.gpus_per_actor", "ppo.engine_sleep", "ppo.learner_offload"]
    role = Role(
        f"{learner.role} + rollout worker (one GPU, taking turns)",
        learner.count,
        1.0,
        round(max(sampling, training, streaming), 2),
        round(host, 2),
        keys=list(dict.fromkeys([*keys, *learner.keys, *worker.keys])),
        weights_gib=worker.weights_gib,
    )
    return role  # the config checked the pairing: as many of each, shares within one GPU (PPOJob)


# --------------------------------------------------------------------------------------------------
# Clusters


@dataclass
class NodeType:
    name: str
    count: int
    gpus: int
    gpu_gib: float | None
    host_gib: float | None
    cpus: float


@dataclass
class Cluster:
    name: str
    node_types: list[NodeType]

    @classmethod
    def from_yaml(cls, path: str | Path) -> Cluster:
        """A Ray cluster launcher YAML: each node type's count (its max_workers; 1 for the head), resources and
        the memory labels paddock reads (``paddock.io/gpu-memory-gib``, ``paddock.io/host-memory-gib``)."""
        import yaml

        doc = yaml.safe_load(Path(path).read_text())
        head = doc.get("head_node_type")
        types = []
        for name, spec in (doc.get("available_node_types") or {}).items():
            res, labels = spec.get("resources") or {}, spec.get("labels") or {}
            gpus = int(res.get("GPU", 0))
            if gpus and LABEL_GPU not in labels:
                raise PlanError(f"{path}: node type {name} has {gpus} GPUs but no '{LABEL_GPU}' label")
            types.append(
                NodeType(
                    name,
                    1 if name == head else int(spec.get("max_workers", 0)),
                    gpus,
                    float(labels[LABEL_GPU]) if LABEL_GPU in labels else None,
                    float(labels[LABEL_HOST]) if LABEL_HOST in labels else None,
                    float(res.get("CPU", 0)),
                )
            )
        if not types:  # a provider without node types (local): one node, this machine's
            types.append(_this_machine())
        return cls(str(doc.get("cluster_name", Path(path).stem)), types)

    @classmethod
    def from_yaml_or_here(cls, path: str | Path | None) -> Cluster:
        """The cluster file, or this machine alone."""
        return cls.from_yaml(path) if path else cls("this machine", [_this_machine()])

    @classmethod
    def from_ray(cls) -> Cluster:
        """The connected Ray cluster's nodes (GPU memory from the label, or the local CUDA device)."""
        import ray

        types = []
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            res, labels = n.get("Resources", {}), n.get("Labels", {}) or {}
            gpus = int(res.get("GPU", 0))
            gpu_gib = float(labels[LABEL_GPU]) if LABEL_GPU in labels else _local_gpu_gib() if gpus else None
            host = float(labels[LABEL_HOST]) if LABEL_HOST in labels else _node_memory_gib(n)
            types.append(NodeType(n["NodeID"][:8], 1, gpus, gpu_gib, host, float(res.get("CPU", 0))))
        return cls("the connected Ray cluster", types)


def _this_machine() -> NodeType:
    import os

    import psutil

    return NodeType("local", 1, 0, None, psutil.virtual_memory().total / GIB, float(os.cpu_count() or 1))


def _node_memory_gib(node: dict[str, Any]) -> float | None:
    """This machine's memory for the node the driver runs on; unknown (None) for other unlabelled nodes."""
    import psutil
    import ray

    here = node.get("NodeManagerAddress") == ray.util.get_node_ip_address()
    return psutil.virtual_memory().total / GIB if here else None


def _local_gpu_gib() -> float | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None


def place(roles: list[Role], cluster: Cluster) -> None:
    """Mark each role fits or not. Roles of one phase run at once and share the cluster; phases (sampling, then
    the fine-tune) run one after the other."""
    for phase in dict.fromkeys(r.phase for r in roles):
        _place([r for r in roles if r.phase == phase], cluster)


def _place(roles: list[Role], cluster: Cluster) -> None:
    """GPUs left on a node type whose GPU and host memory hold each role, largest first."""
    left = {t.name: t.count * t.gpus for t in cluster.node_types}
    for r in roles:
        if r.needs:
            r.fits, r.reason = False, r.needs
    gpu_roles = sorted((r for r in roles if r.gpus_per_process > 0 and r.fits), key=lambda r: -r.device_gib)
    for r in gpu_roles:
        need = math.ceil(r.count * r.gpus_per_process)
        # device_gib is what each GPU of the process holds (a process spanning several, vLLM's tensor parallelism,
        # holds a share of its copy on each, all on one node); a process without it uses one GPU of those it holds
        holders = [
            t
            for t in cluster.node_types
            if t.gpus
            and t.gpus >= r.gpus_per_process  # Ray gives a process its GPUs on one node
            and (t.gpu_gib is None or r.device_gib <= USABLE * t.gpu_gib)
        ]
        widest = max((t.gpus for t in cluster.node_types), default=0)
        if widest and r.gpus_per_process > widest:
            r.fits = False
            r.reason = (
                f"one process takes {r.gpus_per_process:g} GPUs, which must be on one node; the cluster's nodes "
                f"have at most {widest}; change {', '.join(r.keys)}"
            )
            continue
        if not holders:
            biggest = max((t.gpu_gib or 0 for t in cluster.node_types), default=0)
            missing = r.device_gib - USABLE * biggest
            r.fits = False
            r.reason = (
                f"needs {r.device_gib:.1f} GiB on one GPU; the largest usable is {USABLE * biggest:.1f} GiB "
                f"({missing:.1f} GiB missing); change {', '.join(r.keys)}"
                if biggest
                else "the cluster has no GPUs"
            )
            if biggest and r.weights_gib > USABLE * biggest:
                r.reason += f"; its weights alone ({r.weights_gib:.1f} GiB) exceed one GPU: " + (
                    f"spread them over GPUs with {r.spread} (tensor-parallel inference)"
                    if r.spread
                    else "this role needs tensor-parallel inference, which paddock's scorers do not have (they run "
                    "transformers on one GPU)"
                )
            continue
        holders.sort(key=lambda t: t.gpu_gib or 0)
        available = sum(left[t.name] for t in holders)
        if available < need:
            r.fits = False
            r.reason = (
                f"needs {need} GPUs of >= {r.device_gib / USABLE:.0f} GiB; {available} left on the cluster; "
                f"change {', '.join(r.keys)}"
            )
            continue
        taken = 0
        for t in holders:
            got = min(left[t.name], need - taken)
            if got > 0:
                left[t.name] -= got
                taken += got
                r.node_type = r.node_type or t.name
        t = next(t for t in holders if t.name == r.node_type)
        per_node = min(t.gpus, need) / max(r.gpus_per_process, 1e-9)
        if t.host_gib is not None and per_node * r.host_gib > USABLE * t.host_gib:
            r.fits = False
            r.reason = (
                f"{per_node:.0f} processes a node need {per_node * r.host_gib:.0f} GiB of host memory; "
                f"{t.name} has {USABLE * t.host_gib:.0f} usable ({per_node * r.host_gib - USABLE * t.host_gib:.0f} "
                f"GiB missing); change {', '.join(r.keys)}"
            )
            if "learner" in r.role:
                r.reason += (
                    "; below ZeRO-3 each rank loads its models whole in fp32 (train.zero_stage=3 does not)"
                )
    for r in roles:
        if r.gpus_per_process > 0 or not r.fits:
            continue
        # CPU processes: the largest node's host memory bounds each (a driver runs on the head)
        hosts = [t.host_gib for t in cluster.node_types if t.host_gib is not None]
        if hosts and r.host_gib > USABLE * max(hosts):
            r.fits = False
            r.reason = (
                f"needs {r.host_gib:.1f} GiB of host memory; the largest node has {USABLE * max(hosts):.1f} usable "
                f"({r.host_gib - USABLE * max(hosts):.1f} GiB missing); change {', '.join(r.keys)}"
            )
    single = [t for t in cluster.node_types if t.count >= 1]
    if (
        len(single) == 1
        and single[0].count == 1
        and single[0].host_gib is not None
        and all(r.fits for r in roles)
    ):
        # One machine (a laptop, one node): every process shares its memory; the largest role is named.
        total, usable = sum(r.count * r.host_gib for r in roles), USABLE * single[0].host_gib
        if total > usable:
            r = max(roles, key=lambda r: r.count * r.host_gib)
            r.fits = False
            r.reason = (
                f"the stage's processes need {total:.1f} GiB together; this node has {usable:.1f} usable "
                f"({total - usable:.1f} GiB missing); change {', '.join(r.keys)}"
            )


# --------------------------------------------------------------------------------------------------
# Stages


ShapeOf = Callable[[str, bool], ModelShape]  # (model URI or path, scalar head?) -> shape


def resolve_dtype(dtype: str, on_gpu: bool) -> str:
    return ("bf16" if on_gpu else "fp32") if dtype == "auto" else dtype


def job_roles(job: Any, shape_of: ShapeOf) -> list[Role]:
    """The roles of one stage's job config (pipeline jobs: see ``plan_pipeline``)."""
    from paddock import config as c

    if isinstance(job, c.SupervisedJob):
        return _supervised_roles(job, shape_of)
    roles: list[Role] = []
    inf = job.inference

    # The longest sequence the stage's inference reads (prompt + answer); the released context when unstated.
    lengths = [
        getattr(getattr(job, k, None), "seq_len", None)
        for k in ("ppo", "rejection", "distill", "eval", "collect")
    ]
    seq_len = int(next((n for n in lengths if n), 4096))

    def copy(
        name: str,
        ref: str,
        count: int,
        gpus: float,
        scalar: bool,
        generates: bool,
        keys: list[str],
        one_member: bool = False,
    ) -> Role:
        dtype = resolve_dtype(inf.dtype, gpus > 0)
        shape = shape_of(ref, scalar)
        if one_member:  # a value model starts from a reward ensemble's member 0 alone
            shape = replace(shape, members=1)
        keys = [*keys, "inference.dtype", "inference.token_budget"]
        return inference_role(
            name, count, gpus, shape, dtype, inf.token_budget, generates=generates, seq_len=seq_len, keys=keys
        )

    def sampler(name: str, ref: str, count: int, gpus: float, prefix: str) -> Role:
        role = copy(
            name, ref, count, gpus, False, True, [f"{prefix}.rollout_workers", f"{prefix}.gpus_per_actor"]
        )
        role.spread = "inference.engine=vllm and inference.vllm.tensor_parallel"
        if inf.engine == "vllm":
            # vLLM's copy (weights and KV cache) where the transformers model would be. The worker's host mirror
            # of the weights in the Hugging Face layout (paddock.rollout.vllm_engine) is the host copy the weights
            # load into, kept: on a GPU that is the host memory already counted; on a CPU vLLM's own copy is on
            # the host too, and the mirror beside it
            if gpus == 0:
                role.host_gib += role.weights_gib
            role.keys += ["inference.engine", "inference.vllm.memory_share", "inference.vllm.tensor_parallel"]
            role.spread = "inference.vllm.tensor_parallel"
            tp = inf.vllm.tensor_parallel
            if tp > 1 and gpus > 0:
                # one vLLM process on each of tp whole GPUs (paddock.rollout.actors.start_workers), each holding
                # its share of the heads: of the weights, the KV cache and the activations alike
                role.gpus_per_process = tp
                role.device_gib /= tp
                role.weights_gib /= tp
        return role

    def scorer(name: str, ref: str, gpus: float, scalar: bool, one_member: bool = False) -> Role:
        return copy(name, ref, 1, gpus, scalar, False, [], one_member)

    if isinstance(job, c.PPOJob):
        p = job.ppo
        policy = shape_of(job.policy, False)
        learned = [policy]
        if p.value_model:
            learned.append(shape_of(job.value_from or job.reward_helpfulness, True))
        roles.append(
            learner_role(
                "learner (policy + value)" if p.value_model else "learner (policy)",
                learned,
                job.train,
                p.seq_len,
                logits_tokens=p.max_new_tokens,
            )
        )
        roles.append(sampler("rollout worker", job.policy, p.rollout_workers, p.gpus_per_actor, "ppo"))
        if job.colocated_gpus:
            roles[-2:] = [
                taking_turns(
                    roles[-2],
                    roles[-1],
                    sleeps=job.engines_sleep,
                    offloads=job.learners_offload,
                    host_copy=inf.engine == "transformers",
                )
            ]
        reference = (
            not job.reference_on_workers
        )  # a LoRA policy's rollout workers give the reference log-probs
        scorers = [
            *([scorer("reference scorer", job.policy, p.gpus_per_actor, False)] if reference else []),
            scorer("helpfulness RM scorer", job.reward_helpfulness, p.gpus_per_actor, True),
            scorer("safety RM scorer", job.reward_safety, p.gpus_per_actor, True),
        ]
        if p.value_model:
            scorers.append(
                scorer("value scorer", job.value_from or job.reward_helpfulness, p.gpus_per_actor, True, True)
            )
        if p.placement == "colocated":
            names = ["reference"] * reference + ["both RMs"] + ["value"] * p.value_model
            scorers = [together(f"scorers ({', '.join(names)})", scorers, ["ppo.placement"])]
        roles += scorers
    elif isinstance(job, c.FinetuneJob):
        key = {c.RejectionJob: "rejection", c.GAttJob: "gatt", c.DistillJob: "distill"}[type(job)]
        section = getattr(job, key)
        gpus = section.gpus_per_actor
        roles.append(sampler("rollout worker", job.policy, section.rollout_workers, gpus, key))
        if isinstance(job, c.RejectionJob):
            roles.append(scorer("helpfulness RM scorer", job.reward_helpfulness, gpus, True))
        if isinstance(job, c.RejectionJob | c.DistillJob):
            roles.append(scorer("safety RM scorer", job.reward_safety, gpus, True))
        sft = c.load_config(c.SFTJob, job.sft_config, [*job.sft_overrides, f"model.init_from={job.policy}"])
        sft.plan = job.plan
        for r in _supervised_roles(sft, shape_of, "fine-tune "):
            if not r.role.endswith("driver"):
                r.phase = "fine-tune"  # the samplers are gone by then
                roles.append(r)
    elif isinstance(job, c.CollectJob):
        cc = job.collect
        for n, ref in enumerate(job.models):  # two models answer one after the other
            role = sampler("rollout worker", ref, cc.rollout_workers, cc.gpus_per_actor, "collect")
            role.phase = f"answer {'ab'[n]}" if len(job.models) > 1 else role.phase
            roles.append(role)
        if job.picks_by_reward and job.reward_helpfulness and job.reward_safety:
            for name, ref in (("helpfulness", job.reward_helpfulness), ("safety", job.reward_safety)):
                role = scorer(f"{name} RM scorer", ref, cc.gpus_per_actor, True)
                role.phase = "reward pick"  # scores the answers once the rollout workers are gone
                roles.append(role)
    elif isinstance(job, c.EvaluateJob):
        e = job.eval
        roles.append(sampler("rollout worker", job.model, e.rollout_workers, e.gpus_per_actor, "eval"))
        roles.append(scorer("helpfulness RM scorer", job.reward_helpfulness, e.gpus_per_actor, True))
        roles.append(scorer("safety RM scorer", job.reward_safety, e.gpus_per_actor, True))
    elif isinstance(job, c.PromoteJob):
        sv = job.serve
        if sv.gpus_per_replica or sv.max_replicas:
            ref = f"models:/{job.registry_prefix}-chat@champion"
            m = shape_of(ref, False)
            dtype = resolve_dtype(inf.dtype, sv.gpus_per_replica > 0)
            tokens = sv.max_batch_size * (sv.reward_seq_len + sv.default_max_tokens)
            roles.append(
                inference_role(
                    "Serve chat replica",
                    sv.max_replicas,
                    sv.gpus_per_replica,
                    m,
                    dtype,
                    tokens,
                    generates=True,
                    keys=["serve.max_batch_size", "serve.gpus_per_replica", "inference.dtype"],
                )
            )
    roles.append(Role("driver", 1, 0.0, 0.0, DRIVER_HOST_GIB))
    return roles


def _supervised_roles(job: Any, shape_of: ShapeOf, prefix: str = "") -> list[Role]:
    from paddock import config as c

    scalar = isinstance(job, c.RewardJob)
    m = (
        shape_of(job.model.init_from, scalar)
        if job.model.init_from
        else ModelShape.named(job.model.shape, scalar)
    )
    tc = job.train
    # A reward model's micro-batch holds pairs: two sequences each, and a scalar head instead of the vocabulary.
    train = tc.model_copy(update={"micro_batch_size": tc.micro_batch_size * (2 if scalar else 1)})
    role = learner_role(f"{prefix}learner", [m], train, job.data.seq_len, logits_tokens=0 if scalar else None)
    if tc.num_workers == 0:  # local mode: the loop runs in the driver
        role.role = f"{prefix}learner (in the driver)"
    return [role, Role(f"{prefix}driver", 1, 0.0, 0.0, DRIVER_HOST_GIB)]


def plan_job(job: Any, shape_of: ShapeOf, cluster: Cluster, stage: str | None = None) -> Plan:
    roles = job_roles(job, shape_of)
    place(roles, cluster)
    return Plan(stage or type(job).__name__, roles, cluster.name)


def shape_resolver(job: Any) -> ShapeOf:
    """Model shapes from ``plan.shape`` when set, else from the upstream checkpoints (resolved like the stage
    resolves them: registry URIs are downloaded once into the model cache)."""
    cache: dict[tuple[str, bool], ModelShape] = {}

    def shape_of(ref: str, scalar: bool) -> ModelShape:
        if job.plan.shape is not None:
            return ModelShape.named(job.plan.shape, scalar)
        if (ref, scalar) not in cache:
            from paddock import tracking

            try:
                path = tracking.resolve_model(ref)
            except tracking.UpstreamModelError as exc:
                raise PlanError(
                    f"cannot plan without the model {ref}: {exc}; set plan.shape (e.g. --set plan.shape=7b)"
                ) from exc
            cache[(ref, scalar)] = ModelShape.from_checkpoint(path, scalar)
        return cache[(ref, scalar)]

    return shape_of


def check(job: Any, stage: str) -> Plan | None:
    """The check every stage runs before starting any worker: raises ``PlanError`` when a role cannot fit.

    Plans against ``plan.cluster`` when set, else the connected Ray cluster; ``plan.check: false`` skips it."""
    if not job.plan.check:
        return None
    cluster = Cluster.from_yaml(job.plan.cluster) if job.plan.cluster else Cluster.from_ray()
    plan = plan_job(job, shape_resolver(job), cluster, stage)
    plan.refuse()
    return plan


def plan_any(job: Any, stage: str, cluster: Cluster) -> Plan:
    """``plan_job``, or for a pipeline every stage it runs, planned up front (roles named ``stage: role``)."""
    from paddock import config as c

    if not isinstance(job, c.PipelineJob):
        return plan_job(job, shape_resolver(job), cluster, stage)
    roles: list[Role] = []
    for name, spec in job.stages.items():
        if name in ("world", "import_data", "tokenizer"):
            continue
        sub = c.load_config(c.JOBS[name], spec.config, [*spec.overrides, *_inherited(job)])
        sub_roles = job_roles(sub, shape_resolver(sub))
        for r in sub_roles:
            r.role, r.phase = f"{name}: {r.role}", f"{name} {r.phase}"  # stages run one after another
        place(sub_roles, cluster)
        roles += sub_roles
    return Plan(stage, roles, cluster.name)


def _inherited(job: Any) -> list[str]:
    return [f"plan.shape={job.plan.shape}"] if job.plan.shape else []
