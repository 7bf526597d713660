"""The one place that builds models: loads a base, merges parent fine-tunes, chooses the precision,
builds every ``LoraConfig``, turns on activation checkpointing and decides whether a full fine-tune
is sharded with FSDP2 (:func:`sharding_for`; the wrapping itself is ``workers.fsdp``).

Every recipe (and PPO's value and reward adapters, and the reward-model classifier) goes through
here, so a wrong ``target_modules`` gives the same ``invalid_training_type`` error for every method,
``lora_dropout`` means the same everywhere, and precision rules cannot drift between recipes.

Precision is ``workers.precision``'s (re-exported here for callers that load and choose together).

Attention: bases load with an explicit ``attn_implementation`` (:data:`DEFAULT_ATTENTION`, SDPA),
so a transformers upgrade cannot silently change the kernel, and the layouts in
``workers.attention`` know which masks the model takes.

The LM head runs only on positions a loss reads (see ``workers.token_logps`` and the DPO layouts):
for a 49k vocabulary and a long prompt, the full logits tensor is most of a step's memory.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from service.jobs.spec import LoraTraining, TrainingType
from workers.archives import fetch_adapter
from workers.context import JobFailure
from workers.precision import MixedPrecision as MixedPrecision
from workers.precision import Precision as Precision
from workers.precision import choose_precision as choose_precision

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from service.storage import ObjectStore
    from workers.fsdp import Sharding

TaskType = Literal["CAUSAL_LM", "SEQ_CLS"]
TARGET_MODULES_PARAM = "training_type.target_modules"
#: PyTorch's scaled-dot-product attention: flash / memory-efficient kernels on CUDA for causal and
#: padding masks, and it takes the 4D masks of the shared-prompt layout (``workers.pairs``).
#: ``flex_attention`` is chosen per batch by ``workers.attention``, not at load time.
DEFAULT_ATTENTION = "sdpa"


# --------------------------------------------------------------------------- bases


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = DEFAULT_ATTENTION) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=False, use_safetensors=True, local_files_only=True,
        attn_implementation=attn_implementation,
    )
    model.config.use_cache = False
    return model  # type: ignore[no-any-return]


def load_sequence_classifier(path: str | Path, dtype: torch.dtype, pad_token_id: int) -> PreTrainedModel:
    """The decoder's weights under a new scalar ``score`` head (hidden -> 1): a reward model's base."""
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=dtype, trust_remote_code=False, use_safetensors=True,
        local_files_only=True, attn_implementation=DEFAULT_ATTENTION,
    )
    model.config.pad_token_id = pad_token_id  # HF's own forward needs it for batches > 1
    model.config.use_cache = False
    return model  # type: ignore[no-any-return]


def merge_dir(model: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """A parent fine-tune folded in: a LoRA adapter merged into ``model``, or full weights replacing it."""
    if (directory / "adapter_config.json").exists():
        merged = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
        return merged  # type: ignore[no-any-return]
    full = AutoModelForCausalLM.from_pretrained(str(directory), dtype=model.dtype, trust_remote_code=False,
                                                use_safetensors=True, local_files_only=True,
                                                attn_implementation=model.config._attn_implementation)
    full.config.use_cache = False
    return full  # type: ignore[no-any-return]


def merge_adapter(model: PreTrainedModel, store: ObjectStore, adapter_key: str) -> PreTrainedModel:
    """Chaining: a parent job's archive folded into its base becomes this job's base and reference."""
    with tempfile.TemporaryDirectory() as tmp:
        return merge_dir(model, fetch_adapter(store, adapter_key, Path(tmp) / "adapter"))


def load_base(path: Path, dtype: torch.dtype, store: ObjectStore, parent_adapter_keys: list[str]) -> PreTrainedModel:
    """The job's base: the registry model with every parent fine-tune merged in, oldest first."""
    model = load_causal_lm(path, dtype)
    for key in parent_adapter_keys:
        model = merge_adapter(model, store, key)
    return model


def copy_decoder(classifier: PreTrainedModel, causal_lm: PreTrainedModel) -> None:
    """Give ``classifier`` the decoder weights of ``causal_lm`` (e.g. a base with parents merged)."""
    target = getattr(classifier, classifier.base_model_prefix)
    target.load_state_dict(getattr(causal_lm, causal_lm.base_model_prefix).state_dict())


def load_classifier_base(path: Path, dtype: torch.dtype, pad_token_id: int, store: ObjectStore | None,
                         parent_adapter_keys: list[str], parent_dirs: list[Path] | None = None) -> PreTrainedModel:
    """A sequence classifier whose decoder is the job's base (parents merged, from the store or from
    already-extracted directories)."""
    classifier = load_sequence_classifier(path, dtype, pad_token_id)
    if parent_adapter_keys or parent_dirs:
        if store is not None and parent_adapter_keys:
            lm = load_base(path, dtype, store, parent_adapter_keys)
        else:
            lm = load_causal_lm(path, dtype)
            for directory in parent_dirs or []:
                lm = merge_dir(lm, directory)
        copy_decoder(classifier, lm)
        del lm
    return classifier


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner  # type: ignore[return-value]


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in the backward (non-reentrant ``torch.utils.checkpoint``).

    The recomputation runs whatever adapter is active *at backward time*: callers that switch peft
    adapters (PPO's policy and value) must keep one active until its backward has run."""
    model.activation_checkpointing_enable()
    model.enable_input_require_grads()


def activation_checkpointing_on(model: PreTrainedModel) -> bool:
    """Whether :func:`enable_activation_checkpointing` was called on ``model`` (transformers before 5.23,
    as on the GPU image, names it ``is_gradient_checkpointing``)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


# --------------------------------------------------------------------------- sharding


def sharding_for(strategy: str, training_type: TrainingType, precision: Precision,
                 device: torch.device) -> Sharding | None:
    """FSDP2 for a full fine-tune whose strategy is ``fsdp`` on several ranks (``workers.fsdp``), else
    None: the model is then accelerate's to place (one device, or DDP)."""
    from workers import fsdp

    if not fsdp.wants_fsdp(strategy, training_type):
        return None
    return fsdp.Sharding.over_all_ranks(device, precision.mixed, precision.compute)


# --------------------------------------------------------------------------- LoRA


def lora_config(lora: LoraTraining, model: nn.Module, task_type: TaskType = "CAUSAL_LM") -> LoraConfig:
    """The job's LoRA settings for ``model``; target modules it lacks are the user's error."""
    names = [name for name, _ in model.named_modules()]
    missing = [m for m in lora.target_modules if not any(n == m or n.endswith("." + m) for n in names)]
    if missing:
        raise JobFailure("invalid_training_type", f"training_type.target_modules: {missing} not found in the "
                         f"model (it has e.g. {_linear_names(model)[:8]})", TARGET_MODULES_PARAM)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft types it int; floats work
                      lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                      task_type=task_type, bias="none")


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def saved_lora_as_causal(adapter_dir: Path) -> LoraConfig:
    """A saved (e.g. ``SEQ_CLS``) adapter's config as a causal-LM adapter for inference on a shared base."""
    saved = LoraConfig.from_pretrained(str(adapter_dir))
    return replace(saved, task_type="CAUSAL_LM", modules_to_save=None, inference_mode=True)


def wrap_lora(model: PreTrainedModel, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """``get_peft_model``, without the FutureWarning peft 0.21 triggers in transformers 5 by asking for
    ``is_gradient_checkpointing`` (peft's call, nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config, adapter_name=adapter_name)  # type: ignore[return-value]


def apply_training_type(model: PreTrainedModel, training_type: TrainingType, seed: int,
                        task_type: TaskType = "CAUSAL_LM", adapter_name: str = "default") -> nn.Module:
    """LoRA adapters (``SEQ_CLS``: peft also trains and saves the score head) or every weight trainable."""
    if isinstance(training_type, LoraTraining):
        config = lora_config(training_type, model, task_type)
        torch.manual_seed(seed)
        return wrap_lora(model, config, adapter_name)
    model.requires_grad_(True)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Every ``nn.Dropout`` to p=0 (what TRL does to all four PPO models): rollouts and updates then see
    the same function, so the first update's ratio is exactly 1. Saved configs keep the user's value."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's (SmolLM2: ``<|im_end|>``, ``<|endoftext|>``)
    and the tokenizer's EOS."""
    configured: Any = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None))
