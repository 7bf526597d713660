"""The one definition of each method's hyperparameters.

The API decodes requests into these structs (unknown fields are refused, naming the field), the
OpenAPI schema is generated from them, and recipes read the same structs back from the job row, so
a job spec means the same thing in every layer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

PositiveInt = Annotated[int, Meta(ge=1)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]


class CommonHyperparameters(Struct, forbid_unknown_fields=True, kw_only=True):
    n_epochs: Annotated[int, Meta(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Meta(ge=1, le=4096)] = 8
    learning_rate: Annotated[float, Meta(gt=0.0, le=1.0)] = 1e-4
    max_steps: PositiveInt | None = None
    checkpoint_every_steps: PositiveInt | None = None
    max_length: Annotated[int, Meta(ge=16, le=131072)] = 1024
    gradient_accumulation_steps: Annotated[int, Meta(ge=1, le=1024)] = 1
    warmup_ratio: Probability = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    max_grad_norm: Annotated[float, Meta(gt=0.0)] = 1.0
    gradient_checkpointing: bool = False
    eval_every_steps: PositiveInt | None = None


class SupervisedHyperparameters(CommonHyperparameters, kw_only=True):
    pass


class DpoHyperparameters(CommonHyperparameters, kw_only=True):
    beta: Annotated[float, Meta(gt=0.0, le=100.0)] = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: Annotated[float, Meta(ge=0.0, lt=0.5)] = 0.0
    sft_weight: Annotated[float, Meta(ge=0.0)] = 0.0
    precompute_ref_log_probs: bool = False


class RewardModelHyperparameters(CommonHyperparameters, kw_only=True):
    center_rewards_coefficient: Annotated[float, Meta(ge=0.0)] | None = None


class PpoHyperparameters(CommonHyperparameters, kw_only=True):
    reward_model: str | None = None
    kl_coef: Annotated[float, Meta(ge=0.0)] = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    target_kl: Annotated[float, Meta(gt=0.0)] | None = None
    cliprange: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.2
    cliprange_value: Annotated[float, Meta(gt=0.0)] = 0.2
    vf_coef: Annotated[float, Meta(ge=0.0)] = 0.1
    gamma: Probability = 1.0
    lam: Probability = 0.95
    ppo_epochs: Annotated[int, Meta(ge=1, le=100)] = 4
    rollout_batch_size: PositiveInt = 16
    mini_batch_size: PositiveInt = 4
    max_new_tokens: Annotated[int, Meta(ge=1, le=8192)] = 64
    temperature: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None


class GeneratePreferencesHyperparameters(CommonHyperparameters, kw_only=True):
    """Preference-data generation (no training): ``k`` samples per prompt of the job's ``model``, paired
    by a reward-model ``judge`` (best over worst) or by constitutional self-critique (``constitution``:
    the model's revision over its original answer), or both (the judge must prefer the revision).

    ``batch_size`` is prompts per generation batch; prompts keep their last ``max_length -
    max_new_tokens`` tokens. The training-only fields inherited from the common set are not used."""

    judge: Annotated[str, Meta(max_length=512)] | None = None
    constitution: Annotated[list[Annotated[str, Meta(min_length=1, max_length=4000)]],
                            Meta(max_length=64)] | None = None
    k: Annotated[int, Meta(ge=2, le=64)] = 4
    max_new_tokens: Annotated[int, Meta(ge=1, le=8192)] = 128
    temperature: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    min_margin: Annotated[float, Meta(ge=0.0)] = 0.0


class SupervisedMethod(Struct, forbid_unknown_fields=True):
    hyperparameters: SupervisedHyperparameters = msgspec.field(default_factory=SupervisedHyperparameters)


class DpoMethod(Struct, forbid_unknown_fields=True):
    hyperparameters: DpoHyperparameters = msgspec.field(default_factory=DpoHyperparameters)


class RewardModelMethod(Struct, forbid_unknown_fields=True):
    hyperparameters: RewardModelHyperparameters = msgspec.field(default_factory=RewardModelHyperparameters)


class PpoMethod(Struct, forbid_unknown_fields=True):
    hyperparameters: PpoHyperparameters = msgspec.field(default_factory=PpoHyperparameters)


class GeneratePreferencesMethod(Struct, forbid_unknown_fields=True):
    hyperparameters: GeneratePreferencesHyperparameters = msgspec.field(
        default_factory=GeneratePreferencesHyperparameters)


MethodType = Literal["supervised", "dpo", "reward_model", "ppo", "generate_preferences"]


class Method(Struct, forbid_unknown_fields=True):
    """OpenAI's shape: ``{"type": "dpo", "dpo": {"hyperparameters": {...}}}``."""

    type: MethodType
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reward_model: RewardModelMethod | None = None
    ppo: PpoMethod | None = None
    generate_preferences: GeneratePreferencesMethod | None = None

    def hyperparameters(self) -> CommonHyperparameters:
        body = getattr(self, self.type)
        if body is None:
            body = _METHOD_BODIES[self.type]()
        return body.hyperparameters  # type: ignore[no-any-return]

    def normalized(self) -> Method:
        """Only the selected method's block, with every default filled in."""
        body = getattr(self, self.type) or _METHOD_BODIES[self.type]()
        return Method(type=self.type, **{self.type: body})  # type: ignore[arg-type]


_METHOD_BODIES: dict[str, type[Struct]] = {
    "supervised": SupervisedMethod,
    "dpo": DpoMethod,
    "reward_model": RewardModelMethod,
    "ppo": PpoMethod,
    "generate_preferences": GeneratePreferencesMethod,
}

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LoraTraining(Struct, tag="lora", tag_field="type", forbid_unknown_fields=True):
    r: Annotated[int, Meta(ge=1, le=1024)] = 16
    alpha: Annotated[float, Meta(gt=0.0)] = 32.0
    dropout: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0
    target_modules: list[Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.]+$")]] = msgspec.field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES)
    )


class FullTraining(Struct, tag="full", tag_field="type", forbid_unknown_fields=True):
    pass


TrainingType = LoraTraining | FullTraining


MAX_GPUS_PER_NODE = 64
MAX_NODES = 256


class ResourcesConflict(ValueError):
    """``resources`` fields that contradict each other; ``param`` names the field to fix."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Resources(Struct, forbid_unknown_fields=True):
    """Where a job runs.

    ``{"gpus": N}`` is one node: the recipe runs on N GPUs of one worker (DDP; FSDP for a full
    fine-tune). ``{"nodes": M, "gpus_per_node": G}`` runs M×G ranks of the same recipe on M nodes
    under torch.distributed (c10d rendezvous); on Kubernetes the worker submits it as a JobSet.
    ``gpus`` may be given with them and is then the total, which must be M×G; any two of the three
    determine the third (``{"nodes": 2, "gpus": 8}`` is 4 per node). :meth:`layout` checks them."""

    gpus: Annotated[int, Meta(ge=1, le=MAX_GPUS_PER_NODE * MAX_NODES)] | None = None
    nodes: Annotated[int, Meta(ge=1, le=MAX_NODES)] | None = None
    gpus_per_node: Annotated[int, Meta(ge=1, le=MAX_GPUS_PER_NODE)] | None = None

    def layout(self) -> tuple[int, int]:
        """``(nodes, gpus_per_node)``, or :class:`ResourcesConflict` when the fields disagree."""
        nodes, per_node, total = self.nodes, self.gpus_per_node, self.gpus
        if nodes is None and per_node is None:
            if total is not None and total > MAX_GPUS_PER_NODE:
                raise ResourcesConflict(
                    f"resources.gpus is {total}, more than one node holds ({MAX_GPUS_PER_NODE}); "
                    "ask for resources.nodes and resources.gpus_per_node instead", "resources.gpus")
            return 1, total or 1
        if nodes is None:
            nodes = 1
        if per_node is None:
            if total is None:
                per_node = 1
            elif total % nodes:
                raise ResourcesConflict(
                    f"resources.gpus ({total}) is not a multiple of resources.nodes ({nodes}); "
                    "every node runs the same number of ranks", "resources.gpus")
            else:
                per_node = total // nodes
        if per_node > MAX_GPUS_PER_NODE:
            raise ResourcesConflict(f"resources.gpus_per_node would be {per_node}; at most "
                                    f"{MAX_GPUS_PER_NODE}", "resources.gpus_per_node")
        if total is not None and total != nodes * per_node:
            raise ResourcesConflict(
                f"resources.gpus ({total}) must equal resources.nodes × resources.gpus_per_node "
                f"({nodes} × {per_node} = {nodes * per_node}); give two of the three", "resources.gpus")
        return nodes, per_node

    def total_gpus(self) -> int:
        nodes, per_node = self.layout()
        return nodes * per_node


class JobCreate(Struct, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1, max_length=512)]
    training_file: Annotated[str, Meta(min_length=1, max_length=64)]
    method: Method
    validation_file: Annotated[str, Meta(max_length=64)] | None = None
    suffix: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9_-]*$")] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, Annotated[str, Meta(max_length=512)]] | None = None
    training_type: TrainingType = msgspec.field(default_factory=LoraTraining)
    resources: Resources | None = None
    #: answer with the estimate (memory, queue, tokens, steps, duration) and create nothing
    dry_run: bool = False


# Methods whose recipes the workers of this release ship; others are refused at creation.
IMPLEMENTED_METHODS: frozenset[str] = frozenset({"dpo", "supervised", "reward_model", "ppo",
                                                  "generate_preferences"})


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


def method_from_row(data: dict[str, Any]) -> Method:
    return msgspec.convert(data, Method)


def training_type_from_row(data: dict[str, Any]) -> TrainingType:
    return msgspec.convert(data, TrainingType)  # type: ignore[arg-type]
