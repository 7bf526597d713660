"""Resource planning without torch: how much memory a job needs, and which queue's workers can hold it.

The estimate is arithmetic on the base model's ``config.json`` (shipped for the built-ins in
``service/model_configs/``; read from the model's directory for ``ALIGND_MODELS`` entries) and the
job's spec. It is the memory of **one device** (a GPU, or the host for a CPU worker) and follows
what the recipes actually do:

* **Weights** of a LoRA job are loaded in bf16 on a GPU (``workers.modeling.choose_precision``): 2 bytes
  a parameter a copy. Copies by method (``METHOD_COPIES``):

  ====================  =====  =====  ==============================================================
  method                LoRA   full   roles
  ====================  =====  =====  ==============================================================
  supervised            1      1      policy
  reward_model          1      1      policy (+ a score head)
  dpo                   1      2      policy; the reference is the base with the adapter disabled
                                      (LoRA) or a frozen copy (full)
  ppo                   1-2    4      LoRA (the recipe's only mode): policy and value are adapters on
                                      one frozen base, the reference is that base with the adapters
                                      off; a LoRA reward model of the same base is a third adapter
                                      (``JobShape.reward_adapter``: 1 copy), any other reward model
                                      its own copy (2; sized from its own base when known). Full: the
                                      classic four (policy, reference, value, reward)
  reinforcement         1      2      policy; the reference (kl_coef > 0) is the base with the
                                      adapters disabled (LoRA) or a frozen copy (full); model graders
                                      run on the worker too and are not counted
  generate_preferences  2      2      sampling model + judge (no training: no trainable state or
                                      activations kept)
  ====================  =====  =====  ==============================================================

* **Trainable state.** LoRA adapters are kept in fp32 by peft (``autocast_adapter_dtype``): weight
  4 + gradient 4 + AdamW's two moments 8 = 16 bytes per adapter parameter. A full fine-tune trains
  the bf16 weights in place: gradient 2 + AdamW moments 2×2 (torch keeps them in the parameter's
  dtype) = 6 bytes per parameter beyond the copy. ``AMP_FP32_MASTER`` is the usual mixed-precision
  layout instead (fp32 master 4 + fp32 gradient 4 + fp32 moments 8 = 16 bytes beyond the copy),
  for comparison and for recipes that adopt it.
* **Activations** kept for the backward pass, bf16, per token and layer of the micro-batch:
  attention ``2·(5h + 2·kv·d)`` (norm in/out, q/k/v, SDPA output, o_proj input; no ``s²`` term with
  SDPA) and gated MLP ``4h + 8i`` (norm in/out, gate, up, act, product). With gradient
  checkpointing only each layer's input (``2h``) is kept, plus one layer recomputed. A micro-batch
  is ``batch_size`` sequences (SFT), ``2·batch_size`` (DPO and reward models: chosen and rejected
  in one forward) or PPO's ``mini_batch_size`` through both the policy and the value model, each
  of ``max_length`` tokens (or less when the file's analysis shows shorter examples); reinforcement's
  update takes the step's ``batch_size × group_size`` completions in ``gradient_accumulation_steps``
  micro-batches. Under N-GPU
  data parallelism each device takes ``ceil(batch / N)``.
* **Logits** only on completion tokens (``workers.pairs.PairLogps``; taken as half the tokens): bf16 logits
  + fp32 log-softmax + fp32 gradient = 10 bytes × vocabulary per token. Reward models score one
  position and have none.
* **PPO rollouts** add a KV cache of ``rollout_batch_size × max_length`` tokens.
* **Overhead**: 1 GiB for the CUDA context and allocator fragmentation.

Multi-GPU: DDP (the default) replicates all of the above on every device, with the batch split.
FSDP (chosen for full fine-tunes that DDP cannot fit) divides weights, gradients and optimizer state
by N and keeps activations per device. The recipes that shard (SFT, reward model, DPO:
``workers.fsdp``, FSDP2) do so with fp32 master weights (``FSDP2_PRECISION``): per parameter and
rank, every copy's weights 4/N bytes (the frozen DPO reference is sharded too), fp32 gradients and
AdamW moments 12/N; on top, what is unsharded at a time (``fsdp_gather``, bf16: two decoder layers,
the one computing and the one prefetched, plus one embedding-sized unit, the root's tied
embeddings or the untied embedding or LM head) and the gradients of the largest unit before their
fp32 reduce-scatter (``fsdp_reduce``: bf16 and the fp32 copy, 6 bytes a parameter).

Multi-node (``resources.nodes`` = M > 1, ``gpus_per_node`` = G): the same arithmetic over a world of
M×G ranks. A full fine-tune is sharded with FSDP across all M×G ranks (weights, gradients and
optimizer state divide by M×G; one layer is gathered in full at a time); LoRA runs DDP, which
replicates the frozen base and the adapters on every rank. Either way each rank takes
``ceil(batch / (M×G))`` sequences of a global batch.

Routing: ``ALIGND_QUEUES`` lists queues with the memory of one device of their workers and how many
devices a worker (or, for a ``multinode`` queue, one node) has. A job goes to the smallest queue that
holds its per-device estimate and its device count; a job on several nodes only to a ``multinode``
queue with enough GPUs per node and nodes. If none does it is refused (``insufficient_resources``)
with what it needs and what the largest queue offers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.settings import QueueSpec, Settings

GiB = 1 << 30
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
OVERHEAD_BYTES = 1 * GiB
BF16 = 2
LOGIT_BYTES_PER_VOCAB = 10  # bf16 logits + fp32 log-softmax + fp32 gradient
COMPLETION_SHARE = 0.5


@dataclass(frozen=True)
class Precision:
    """The device's precision: bytes per parameter (a frozen or trained copy's weights, a full
    fine-tune's extra state, LoRA's), per activation element kept for the backward pass, per
    vocabulary entry of a logit row, and the device's fixed overhead."""

    name: str
    weight: int = BF16
    full_trainable_extra: int = 6   # grad 2 + AdamW m, v in bf16 (2 + 2)
    adapter: int = 16               # fp32 weight 4 + grad 4 + m 4 + v 4
    activation: int = BF16
    logit_per_vocab: int = LOGIT_BYTES_PER_VOCAB
    overhead: int = OVERHEAD_BYTES


RECIPE_PRECISION = Precision("recipe: bf16 weights, AdamW state in the parameter dtype, fp32 LoRA")
AMP_FP32_MASTER = Precision("amp: bf16 copy + fp32 master, fp32 grad and fp32 AdamW state",
                            full_trainable_extra=16)
FSDP2_PRECISION = Precision("fsdp2: fp32 sharded master weights, fp32 grad and AdamW state; bf16 gathers",
                            weight=4, full_trainable_extra=12)
#: Methods whose recipes shard a full fine-tune with FSDP2 (``workers.fsdp``)
FSDP2_METHODS = frozenset({"supervised", "reward_model", "dpo"})
FP32 = 4
#: A CPU worker: the recipes keep everything in fp32 there (``workers.modeling.choose_precision``):
#: weights 4, a full fine-tune's gradient 4 + AdamW moments 8, fp32 activations and logits (logits 4 +
#: log-softmax 4 + gradient 4), and no CUDA context: the overhead is the host process's own (the
#: tokenizer, the tokenised data, the allocator's slack; 50-150 MB measured). ``bench/memory_estimate.py``
#: holds it to the measured peak RSS.
CPU_FP32 = Precision("cpu: fp32 weights, activations and AdamW state", weight=FP32, full_trainable_extra=12,
                     activation=FP32, logit_per_vocab=12, overhead=64 << 20)

#: (LoRA copies, full copies, trainable models) per method; see the module docstring.
METHOD_COPIES: dict[str, tuple[int, int, int]] = {
    "supervised": (1, 1, 1),
    "reward_model": (1, 1, 1),
    "dpo": (1, 2, 1),
    "ppo": (2, 4, 2),
    "generate_preferences": (2, 2, 0),
    "reinforcement": (1, 2, 1),
}
_NON_GATED = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "falcon", "phi", "bloom", "gpt_bigcode"})


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    gated_mlp: bool = True
    attention_bias: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        def first(*names: str, default: Any = None) -> Any:
            for name in names:
                if config.get(name) is not None:
                    return config[name]
            if default is None:
                raise ModelConfigError(f"config.json has none of {', '.join(names)}")
            return default

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head"))
        return cls(
            hidden_size=hidden,
            num_layers=int(first("num_hidden_layers", "n_layer")),
            num_heads=heads,
            num_kv_heads=int(first("num_key_value_heads", default=heads)),
            head_dim=int(first("head_dim", default=hidden // heads)),
            intermediate_size=int(first("intermediate_size", "n_inner", default=4 * hidden)),
            vocab_size=int(first("vocab_size")),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            gated_mlp=str(config.get("model_type", "llama")) not in _NON_GATED,
            attention_bias=bool(config.get("attention_bias", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its usual module name."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        shapes = {"q_proj": (h, self.num_heads * d), "k_proj": (h, self.num_kv_heads * d),
                  "v_proj": (h, self.num_kv_heads * d), "o_proj": (self.num_heads * d, h),
                  "up_proj": (h, i), "down_proj": (i, h)}
        if self.gated_mlp:
            shapes["gate_proj"] = (h, i)
        return shapes

    def layer_parameters(self) -> int:
        weights = sum(a * b for a, b in self.linear_shapes().values())
        biases = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return weights + biases + 2 * self.hidden_size  # two RMSNorms

    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def parameters(self) -> int:
        return self.num_layers * self.layer_parameters() + self.embedding_parameters() + self.hidden_size

    def lora_parameters(self, r: int, target_modules: Sequence[str]) -> int:
        """``r·(in + out)`` per targeted linear layer, over all layers (plus the head/embeddings if named)."""
        shapes = self.linear_shapes()
        total = sum(r * sum(shapes[m]) for m in target_modules if m in shapes) * self.num_layers
        if "lm_head" in target_modules:
            total += r * (self.hidden_size + self.vocab_size)
        if "embed_tokens" in target_modules:
            total += r * (self.hidden_size + self.vocab_size)
        return total

    def activation_bytes_per_token_layer(self, element: int = BF16) -> int:
        h, kv_d, i = self.hidden_size, self.num_kv_heads * self.head_dim, self.intermediate_size
        attention = element * (5 * h + 2 * kv_d)
        mlp = element * (2 * h + (4 if self.gated_mlp else 2) * i)
        return attention + mlp

    def kv_cache_bytes_per_token(self, element: int = BF16) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element


@dataclass(frozen=True)
class JobShape:
    """What the estimate needs from a job spec (plain values, so tests can build one by hand)."""

    method: str                      # supervised | dpo | reward_model | ppo
    lora: bool
    lora_r: int = 16
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch_size: int = 8
    max_length: int = 1024
    gradient_checkpointing: bool = False
    # PPO only
    rollout_batch_size: int = 16
    mini_batch_size: int = 4
    #: the reward model is a LoRA of the job's own base: loaded as a third adapter, no copy of its own
    reward_adapter: bool = False
    #: reinforcement's update splits the step's batch_size x group_size completions into this many micro-batches
    gradient_accumulation_steps: int = 1


@dataclass
class MemoryEstimate:
    bytes: int                        # per device
    devices: int                      # world size: all ranks on all nodes
    strategy: str                     # single | ddp | fsdp
    parameters: int
    trainable_parameters: int
    model_copies: int
    sequence_length: int
    components: dict[str, int] = field(default_factory=dict)
    precision: str = RECIPE_PRECISION.name
    nodes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _micro_sequences(job: JobShape, devices: int) -> int:
    if job.method == "ppo":
        return math.ceil(job.mini_batch_size / devices)
    if job.method == "reinforcement":  # every completion of the step, in gradient_accumulation_steps parts
        return math.ceil(math.ceil(job.rollout_batch_size / devices) / max(1, job.gradient_accumulation_steps))
    per_device = math.ceil(job.batch_size / devices)
    return 2 * per_device if job.method in ("dpo", "reward_model") else per_device


def estimate_memory(model: ModelShape, job: JobShape, *, devices: int = 1, strategy: str | None = None,
                    sequence_length: int | None = None, reward_model: ModelShape | None = None,
                    precision: Precision = RECIPE_PRECISION, nodes: int = 1) -> MemoryEstimate:
    """Peak memory of one device for ``job`` on ``model`` (see the module docstring for each term).

    ``devices`` is the world size (every rank on every node); ``nodes`` is recorded, not used: a rank's
    memory depends on how many ranks share the work, not on where they sit."""
    if job.method not in METHOD_COPIES:
        raise ValueError(f"unknown method {job.method!r}")
    strategy = strategy or ("single" if devices == 1 else "ddp")
    shard = devices if strategy == "fsdp" else 1
    fsdp2 = strategy == "fsdp" and not job.lora and job.method in FSDP2_METHODS
    if fsdp2 and precision is RECIPE_PRECISION:
        precision = FSDP2_PRECISION
    params = model.parameters()
    lora_copies, full_copies, trainable_models = METHOD_COPIES[job.method]
    copies = lora_copies if job.lora else full_copies
    if job.method == "ppo" and job.lora and job.reward_adapter:
        copies = 1
    seq = min(job.max_length, sequence_length) if sequence_length else job.max_length

    # weights: the reward model of a PPO job may have its own base
    copy_bytes = [params * precision.weight] * copies
    if job.method == "ppo" and reward_model is not None and copies > 1:
        copy_bytes[-1] = reward_model.parameters() * precision.weight
    weights = sum(copy_bytes)
    if job.lora:
        trainable = model.lora_parameters(job.lora_r, job.lora_target_modules) * trainable_models
        trainable_state = trainable * precision.adapter
    else:
        trainable = params * trainable_models
        trainable_state = trainable * precision.full_trainable_extra
    if job.method in ("reward_model", "ppo"):  # score / value heads: hidden → 1, fully trained in fp32
        trainable += model.hidden_size
        trainable_state += model.hidden_size * 16

    tokens = _micro_sequences(job, devices) * seq
    per_layer = model.activation_bytes_per_token_layer(precision.activation)
    if job.gradient_checkpointing:
        activations = tokens * (model.num_layers * precision.activation * model.hidden_size + per_layer)
    else:
        activations = tokens * model.num_layers * per_layer
    activations *= trainable_models  # PPO backpropagates through the policy and the value model
    logits = 0 if job.method == "reward_model" else int(tokens * COMPLETION_SHARE) * model.vocab_size * \
        precision.logit_per_vocab
    components = {"weights": weights // shard, "trainable_state": trainable_state // shard,
                  "activations": activations, "logits": logits, "overhead": precision.overhead}
    if job.method in ("ppo", "reinforcement"):  # generation: batch_size x group_size sequences for RFT
        rollouts = math.ceil(job.rollout_batch_size / devices)
        components["kv_cache"] = rollouts * seq * model.kv_cache_bytes_per_token(precision.activation)
    if fsdp2:
        components |= fsdp2_unsharded(model)
    elif strategy == "fsdp":  # one layer gathered in full (and the next prefetched)
        components["fsdp_gather"] = 2 * model.layer_parameters() * precision.weight
    return MemoryEstimate(bytes=sum(components.values()), devices=devices, strategy=strategy,
                          parameters=params, trainable_parameters=trainable, model_copies=copies,
                          sequence_length=seq, components=components, precision=precision.name,
                          nodes=nodes)


def fsdp2_unsharded(model: ModelShape) -> dict[str, int]:
    """What FSDP2 holds unsharded on a rank at a time, beyond its shards (module docstring)."""
    layer, embedding = model.layer_parameters(), model.vocab_size * model.hidden_size
    return {"fsdp_gather": (2 * layer + embedding) * BF16, "fsdp_reduce": max(layer, embedding) * (BF16 + FP32)}


# --------------------------------------------------------------------------- model configs


def builtin_config_path(name: str) -> Path | None:
    path = CONFIG_DIR / f"{name}.json"
    return path if path.is_file() and path.parent == CONFIG_DIR else None


def load_model_config(name: str, settings: Settings) -> dict[str, Any] | None:
    """The ``config.json`` of a base model name, without torch: the configured directory, the
    worker's materialised cache, or the config shipped for the built-ins. None when unknown."""
    candidates: list[Path] = []
    location = settings.models.get(name)
    if location and not location.startswith("s3://"):
        candidates.append(Path(location.removeprefix("file://")).expanduser() / "config.json")
    elif location is None:
        shipped = builtin_config_path(name)
        if shipped is not None:
            candidates.append(shipped)
        if "/" not in name and not name.startswith("."):
            candidates.append(Path(settings.model_cache_dir) / name / "config.json")
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return None


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Placement:
    queue: QueueSpec
    estimate: MemoryEstimate | None


class InsufficientResources(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    return f"{n / GiB:.1f} GiB"


def _fits(queue: QueueSpec, per_device: int | None, devices: int) -> bool:
    if queue.devices is not None and queue.devices < devices:
        return False
    return queue.capacity_bytes is None or per_device is None or per_device <= queue.capacity_bytes


def _size_key(queue: QueueSpec) -> tuple[bool, int, bool, int, bool]:
    # on a tie a plain queue wins: its workers run the job themselves instead of launching a JobSet
    return (queue.capacity_bytes is None, queue.capacity_bytes or 0,
            queue.devices is None, queue.devices or 0, queue.multinode)


def _holds_nodes(queue: QueueSpec, nodes: int) -> bool:
    return nodes == 1 or (queue.multinode and (queue.max_nodes is None or queue.max_nodes >= nodes))


def _no_queue_for(queues: Sequence[QueueSpec], devices: int, nodes: int) -> InsufficientResources:
    if nodes == 1:
        most = max((q.devices or 0 for q in queues), default=0)
        return InsufficientResources(f"the job asks for {devices} GPUs; the largest worker has {most}")
    multinode = [q for q in queues if q.multinode]
    if not multinode:
        return InsufficientResources(
            f"the job asks for {nodes} nodes; no queue here launches multi-node jobs "
            f"(queues: {', '.join(q.name for q in queues)}). Ask for one node, or configure a queue "
            "with ':multinode' in ALIGND_QUEUES")
    nodes_ok = [q for q in multinode if _holds_nodes(q, nodes)]
    if not nodes_ok:
        most = max(q.max_nodes or 0 for q in multinode)
        return InsufficientResources(f"the job asks for {nodes} nodes; multi-node queues take at most {most}")
    most = max(q.devices or 0 for q in nodes_ok)
    return InsufficientResources(
        f"the job asks for {devices} GPUs per node; the multi-node queues' nodes have at most {most}")


def place(queues: Sequence[QueueSpec], model: ModelShape | None, job: JobShape, *, devices: int = 1,
          nodes: int = 1, sequence_length: int | None = None,
          reward_model: ModelShape | None = None) -> Placement:
    """The smallest queue that holds the job; ``devices`` are the GPUs on each of ``nodes`` nodes.

    One node: DDP first, then FSDP for a full fine-tune on N > 1. Several nodes: a ``multinode`` queue
    only, FSDP over all ranks for a full fine-tune, DDP for LoRA (module docstring)."""
    candidates = [q for q in queues if (q.devices is None or q.devices >= devices) and _holds_nodes(q, nodes)]
    if not candidates:
        raise _no_queue_for(queues, devices, nodes)
    if model is None:  # unknown shape: the largest queue, which is the likeliest to hold it
        return Placement(max(candidates, key=_size_key), None)
    world = devices * nodes
    if nodes > 1:
        strategies = ["ddp"] if job.lora else ["fsdp"]
    else:
        strategies = ["single"] if devices == 1 else (["ddp", "fsdp"] if not job.lora else ["ddp"])
    first: MemoryEstimate | None = None
    for strategy in strategies:
        estimate = estimate_memory(model, job, devices=world, strategy=strategy, nodes=nodes,
                                   sequence_length=sequence_length, reward_model=reward_model)
        first = first or estimate
        fitting = [q for q in candidates if _fits(q, estimate.bytes, devices)]
        if fitting:
            return Placement(min(fitting, key=_size_key), estimate)
    assert first is not None
    largest = max(candidates, key=_size_key)
    hint = " (FSDP across the GPUs was considered too)" if "fsdp" in strategies and nodes == 1 else ""
    where = f"{devices} device(s)" if nodes == 1 else f"{nodes} nodes × {devices} GPUs = {world} ranks"
    more = "more GPUs" if nodes == 1 else "more nodes"
    raise InsufficientResources(
        f"the job needs about {fmt_bytes(first.bytes)} per device ({first.strategy}, "
        f"{where}){hint}; "
        f"the largest queue, '{largest.name}', has {fmt_bytes(largest.capacity_bytes)} per device. "
        f"Use LoRA, a smaller batch_size or max_length, gradient_checkpointing, or {more}.")
