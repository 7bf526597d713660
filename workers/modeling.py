"""Model plumbing shared by the recipes: loading bases (and chained fine-tunes), LoRA, log-probs.

The LM head runs only on positions a loss reads: for a 49k vocabulary and a long prompt, the full
logits tensor is most of a step's memory and a good part of its time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from service.jobs.spec import LoraTraining, TrainingType
from workers.checkpointing import fetch_adapter
from workers.losses import selective_log_softmax


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on GPUs that support it; fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=False, use_safetensors=True, local_files_only=True
    )
    model.config.use_cache = False
    return model  # type: ignore[no-any-return]


def merge_adapter(model: PreTrainedModel, store: Any, adapter_key: str) -> PreTrainedModel:
    """Chaining: a parent job's adapter folded into its base becomes this job's base and reference."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = fetch_adapter(store, adapter_key, Path(tmp) / "adapter")
        if (adapter_dir / "adapter_config.json").exists():
            merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            return merged  # type: ignore[no-any-return]
        full = AutoModelForCausalLM.from_pretrained(str(adapter_dir), dtype=model.dtype, trust_remote_code=False,
                                                    use_safetensors=True, local_files_only=True)
        return full  # type: ignore[no-any-return]


def apply_training_type(model: PreTrainedModel, training_type: TrainingType, seed: int) -> nn.Module:
    if isinstance(training_type, LoraTraining):
        torch.manual_seed(seed)
        config = LoraConfig(r=training_type.r, lora_alpha=training_type.alpha,  # type: ignore[arg-type] # peft accepts floats lora_dropout=training_type.dropout,
                            target_modules=list(training_type.target_modules), task_type="CAUSAL_LM", bias="none")
        missing = [m for m in config.target_modules or [] if not any(n.endswith(m) for n, _ in model.named_modules())]
        if missing:
            raise ValueError(f"training_type.target_modules: {missing} not found in the model")
        return get_peft_model(model, config)
    model.requires_grad_(True)
    return model


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner  # type: ignore[return-value]


class SequenceLogps(nn.Module):
    """Per-sequence sum of log p(token) over ``loss_mask`` positions, and the token counts.

    A module (not a function) so that accelerate/DDP wraps the whole computation: DDP syncs
    gradients only for forwards that go through the wrapper.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lm = causal_lm_of(self.model)
        decoder = getattr(lm, lm.base_model_prefix)
        head = lm.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets_mask = loss_mask[:, 1:].bool()
        selected = hidden[:, :-1][targets_mask]
        targets = input_ids[:, 1:][targets_mask]
        token_logps = selective_log_softmax(head(selected), targets)
        rows = targets_mask.nonzero(as_tuple=True)[0]
        sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device)
        sums = sums.index_add(0, rows, token_logps)
        return sums, targets_mask.sum(dim=1)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
