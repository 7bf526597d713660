"""The one definition of each method's hyperparameters.

The API decodes requests into these structs (unknown fields are refused, naming the field), the
OpenAPI schema is generated from them, and recipes read the same structs back from the job row, so
a job spec means the same thing in every layer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from service.graders.types import Grader

PositiveInt = Annotated[int, Meta(ge=1)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]


class EarlyStopping(Struct, forbid_unknown_fields=True, kw_only=True):
    """Stop a job whose ``metric`` has not improved for ``patience`` evaluations (it then succeeds)."""

    metric: str = "eval/loss"
    patience: int = 3


#: the evaluation metrics ``checkpoint_selection: best`` and ``early_stopping`` may follow
SELECTION_METRICS: tuple[str, ...] = ("eval/loss", "eval/retention")


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
    #: "best": the result is the checkpoint with the best evaluation metric (a checkpoint at every eval)
    checkpoint_selection: Literal["last", "best"] = "last"
    early_stopping: EarlyStopping | None = None


class SupervisedHyperparameters(CommonHyperparameters, kw_only=True):
    #: pack examples into rows of ``max_length`` tokens with per-example positions and a document mask
    #: (no padding; the loss is unchanged), where the model's attention takes such a mask
    packing: bool = True


class DpoHyperparameters(CommonHyperparameters, kw_only=True):
    """Defaults chosen by measurement (``bench/dpo_defaults_sweep.py``, docs/choosing-a-method.md):
    lr 5e-4, one epoch, beta 0.1 learned the held-out preference (accuracy 1.0) and kept every probed
    fact on SmolLM2-135M-Instruct; 1e-3 over two epochs began to lose facts."""

    learning_rate: Annotated[float, Meta(gt=0.0, le=1.0)] = 5e-4
    n_epochs: Annotated[int, Meta(ge=1, le=1000)] = 1
    beta: Annotated[float, Meta(gt=0.0, le=100.0)] = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: Annotated[float, Meta(ge=0.0, lt=0.5)] = 0.0
    sft_weight: Annotated[float, Meta(ge=0.0)] = 0.0
    precompute_ref_log_probs: bool = False
    #: the retention probe (``workers.retention``): a reinforcement-format file whose prompts the base
    #: answers right, graded by ``retention_grader``; needs a ``validation_file`` (it runs at each eval)
    retention_file: Annotated[str, Meta(max_length=128)] | None = None
    retention_grader: Grader | None = None
    retention_max_new_tokens: Annotated[int, Meta(ge=1, le=1024)] = 32


class RewardModelHyperparameters(CommonHyperparameters, kw_only=True):
    center_rewards_coefficient: Annotated[float, Meta(ge=0.0)] | None = None
    #: as for supervised jobs: chosen and rejected sequences packed into rows, scores unchanged
    packing: bool = True


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


Auto = Literal["auto"]


class ReinforcementHyperparameters(CommonHyperparameters, kw_only=True):
    """Reinforcement fine-tuning with a grader (OpenAI's RFT): sample ``group_size`` completions for each
    of ``batch_size`` prompts, grade them, and update the policy on group-relative advantages.

    OpenAI's fields come first, "auto" allowed where OpenAI allows it; "auto" resolves when the spec
    is decoded (``n_epochs`` and ``batch_size`` to the common defaults, the multipliers to 1.0,
    ``eval_interval``/``eval_samples`` to None: the recipe's default). The effective learning rate is
    ``learning_rate * learning_rate_multiplier``. ``reasoning_effort`` and ``compute_multiplier`` are
    accepted for compatibility; an event on the job says when they have no effect.

    The rest are alignd's, with TRL 1.16 ``GRPOConfig``'s defaults where TRL has the knob:
    ``group_size`` = ``num_generations`` (8), ``max_new_tokens`` = ``max_completion_length`` (512),
    ``temperature`` (1.0), ``top_p`` (1.0), ``kl_coef`` = ``beta`` (0.0; the reference is the base with
    the adapters disabled), ``loss_type`` ("dapo"), ``epsilon`` (0.2), ``epsilon_high`` (None: same as
    ``epsilon``), ``scale_rewards`` ("group"; True/False mean "group"/"none"),
    ``mask_truncated_completions`` (False), ``num_iterations`` (1), ``kl_bias_correction`` =
    ``use_bias_correction_kl`` (True: the KL term times the importance ratio). ``algorithm``: "grpo" (default),
    "rloo" (leave-one-out baseline) or "ppo" (the PPO engine with the grader as its reward).
    """

    # OpenAI's reinforcement hyperparameters
    n_epochs: Annotated[int, Meta(ge=1, le=1000)] | Auto = 1  # type: ignore[assignment]
    batch_size: Annotated[int, Meta(ge=1, le=4096)] | Auto = 8  # type: ignore[assignment]
    learning_rate_multiplier: Annotated[float, Meta(gt=0.0, le=100.0)] | Auto = 1.0
    eval_interval: PositiveInt | Auto | None = None
    eval_samples: PositiveInt | Auto | None = None
    compute_multiplier: Annotated[float, Meta(gt=0.0, le=100.0)] | Auto = 1.0
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    # alignd's
    algorithm: Literal["grpo", "rloo", "ppo"] = "grpo"
    group_size: Annotated[int, Meta(ge=2, le=256)] = 8
    max_new_tokens: Annotated[int, Meta(ge=1, le=32768)] = 512
    temperature: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    kl_coef: Annotated[float, Meta(ge=0.0)] = 0.0
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    epsilon: Annotated[float, Meta(gt=0.0, le=10.0)] = 0.2
    epsilon_high: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    scale_rewards: Literal["group", "batch", "none"] | bool = "group"
    mask_truncated_completions: bool = False
    num_iterations: Annotated[int, Meta(ge=1, le=100)] = 1
    kl_bias_correction: bool = True

    def __post_init__(self) -> None:
        defaults = CommonHyperparameters()
        if self.n_epochs == "auto":
            self.n_epochs = defaults.n_epochs
        if self.batch_size == "auto":
            self.batch_size = defaults.batch_size
        if self.learning_rate_multiplier == "auto":
            self.learning_rate_multiplier = 1.0
        if self.compute_multiplier == "auto":
            self.compute_multiplier = 1.0
        if self.eval_interval == "auto":
            self.eval_interval = None
        if self.eval_samples == "auto":
            self.eval_samples = None
        if self.scale_rewards is True:
            self.scale_rewards = "group"
        elif self.scale_rewards is False:
            self.scale_rewards = "none"

    @property
    def effective_learning_rate(self) -> float:
        return self.learning_rate * float(self.learning_rate_multiplier)

    def ignored_settings(self) -> list[str]:
        """What to tell the user about OpenAI hyperparameters a local run accepts but cannot honour."""
        notes: list[str] = []
        if self.reasoning_effort != "default":
            notes.append(f"reasoning_effort '{self.reasoning_effort}' has no effect: local models have no "
                         "reasoning budget")
        if self.compute_multiplier != 1.0:
            notes.append(f"compute_multiplier {self.compute_multiplier} has no effect: set group_size (samples "
                         "per prompt) or max_new_tokens to spend more compute")
        return notes


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


class ReinforcementMethod(Struct, forbid_unknown_fields=True):
    """OpenAI's ``{"grader": <grader>, "hyperparameters": {...}}``; the grader is one of service.graders.types."""

    grader: Grader
    hyperparameters: ReinforcementHyperparameters = msgspec.field(default_factory=ReinforcementHyperparameters)


MethodType = Literal["supervised", "dpo", "reward_model", "ppo", "reinforcement", "generate_preferences"]


class Method(Struct, forbid_unknown_fields=True):
    """OpenAI's shape: ``{"type": "dpo", "dpo": {"hyperparameters": {...}}}``."""

    type: MethodType
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reward_model: RewardModelMethod | None = None
    ppo: PpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None
    generate_preferences: GeneratePreferencesMethod | None = None

    def hyperparameters(self) -> CommonHyperparameters:
        """The selected method's hyperparameters (defaults when its block is absent; a reinforcement
        method always has its block, since its grader is required: check_job refuses it otherwise)."""
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
    "reinforcement": ReinforcementMethod,
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
                                                  "reinforcement", "generate_preferences"})


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


def method_from_row(data: dict[str, Any]) -> Method:
    return msgspec.convert(data, Method)


def training_type_from_row(data: dict[str, Any]) -> TrainingType:
    return msgspec.convert(data, TrainingType)  # type: ignore[arg-type]
