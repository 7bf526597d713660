"""The roles of online RL on one copy of the base weights: policy, value, reference and reward.

The base (with any parent fine-tunes merged in) is frozen. The policy is the LoRA adapter
``policy`` on it; the value function (PPO only) is the LoRA adapter ``value`` on the same base plus a
linear value head (hidden -> 1, zero-initialised); the reference is the same base with adapters
disabled; a reward model trained as a LoRA on this very base becomes a third adapter ``reward`` with
its score head beside it (peft cannot attach a SEQ_CLS adapter's head to a causal LM).

Switching adapters is scoped (:meth:`SharedBase.using`): activation checkpointing recomputes a layer
in the backward with whatever adapter is active *then*, so a role's backward must run inside the
block that made its forward. :class:`SharedBaseWeights` writes and restores the trained roles for
checkpoints (the policy at the archive's top level, so a checkpoint loads with peft like any alignd
adapter; the value adapter in ``value/`` and its head in ``value_head.safetensors``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from service.jobs.spec import LoraTraining
from workers.batching import position_ids
from workers.modeling import activation_checkpointing_on, causal_lm_of, lora_config, saved_lora_as_causal, wrap_lora

POLICY, VALUE, REWARD = "policy", "value", "reward"
HEAD_KEYS = ("score", "classifier")
VALUE_HEAD_FILE = "value_head.safetensors"


class SharedBase(nn.Module):
    """One frozen causal LM with LoRA adapters ``policy`` (and ``value``, and maybe ``reward``),
    a value head, and (on the adapter path) the reward model's score head."""

    def __init__(self, base: PreTrainedModel, lora: LoraTraining, seed: int, *, with_value: bool = True) -> None:
        super().__init__()
        config = lora_config(lora, base)
        torch.manual_seed(seed)
        self.peft: PeftModel = wrap_lora(base, config, adapter_name=POLICY)
        self.policy_params = [p for n, p in self.peft.named_parameters() if f".{POLICY}." in n]
        self.value_params: list[nn.Parameter] = []
        self.value_head: nn.Linear | None = None
        if with_value:
            torch.manual_seed(seed + 1)
            self.peft.add_adapter(VALUE, config)
            self.value_head = nn.Linear(int(base.config.hidden_size), 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_params = [p for n, p in self.peft.named_parameters() if f".{VALUE}." in n]
            self.value_params += list(self.value_head.parameters())
        self.reward_head: nn.Linear | None = None
        self._frozen: list[nn.Parameter] = []
        self._activate(POLICY)

    @property
    def trainable(self) -> list[nn.Parameter]:
        return self.policy_params + self.value_params

    def _activate(self, adapter: str) -> None:
        """peft's ``set_adapter`` also flips ``requires_grad`` (only the active adapter trainable);
        policy and value stay trainable, reward frozen."""
        self.peft.set_adapter(adapter)
        self._fix_grads()

    def _fix_grads(self) -> None:
        for p in self.trainable:
            p.requires_grad_(True)
        for p in self._frozen:
            p.requires_grad_(False)

    @contextmanager
    def using(self, adapter: str) -> Iterator[None]:
        """``adapter`` active inside the block (run its backward inside too); the policy after it."""
        self._activate(adapter)
        try:
            yield
        finally:
            self._activate(POLICY)

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The base with every adapter off: the KL reference, at no extra weights."""
        with self.peft.disable_adapter():
            yield
        self._fix_grads()

    def _decoder(self) -> nn.Module:
        lm = causal_lm_of(self.peft)
        return getattr(lm, lm.base_model_prefix)  # type: ignore[no-any-return]

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self._decoder()(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask))
        return out.last_hidden_state  # type: ignore[no-any-return]

    def response_hidden(self, prompts: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor,
                        prompt_of_row: Tensor) -> Tensor | None:
        """Hidden states ``[rows, T, H]`` at the positions that predict each response token, with each
        prompt run once however many responses share it: the prompts' forward fills a KV cache, the
        cache is gathered to one row per response (``prompt_of_row`` indexes ``prompts``; the gather is
        differentiable, so a prompt's backward also runs once), and the responses run on top of it.
        A group of G samples then costs its prompt once in the update, as it did in sampling.

        None where the decoder cannot hand back a cache (activation checkpointing in training turns
        ``use_cache`` off): the caller runs the whole rows instead (:meth:`hidden`)."""
        if activation_checkpointing_on(causal_lm_of(self.peft)) and self.peft.training:
            return None
        decoder = self._decoder()
        head = decoder(input_ids=prompts, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                       use_cache=True)
        cache = head.past_key_values
        if cache is None or not hasattr(cache, "batch_select_indices"):
            return None
        cache.batch_select_indices(prompt_of_row)
        start = prompt_mask.long().sum(dim=1)[prompt_of_row]  # the first response token's position
        steps = torch.arange(responses.shape[1], device=responses.device)
        mask = torch.cat([prompt_mask[prompt_of_row], response_mask.long()], dim=1)
        tail = decoder(input_ids=responses, attention_mask=mask, position_ids=start[:, None] + steps,
                       past_key_values=cache, use_cache=True)
        first = head.last_hidden_state[prompt_of_row, -1:]  # the prompt's last token predicts the first
        return torch.cat([first, tail.last_hidden_state[:, :-1]], dim=1)

    def lm_head(self) -> nn.Module:
        return causal_lm_of(self.peft).get_output_embeddings()  # type: ignore[no-any-return]

    def values(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """``[b, T]`` value estimates at the positions before each response token (call inside
        ``using(VALUE)``)."""
        assert self.value_head is not None, "this SharedBase has no value function"
        context = input_ids.shape[1] - response_length
        hidden = self.hidden(input_ids, attention_mask)[:, context - 1:-1]
        return self.value_head(hidden.float()).squeeze(-1)  # type: ignore[no-any-return]

    # the reward model as a third adapter -----------------------------------------------------
    def add_reward_adapter(self, adapter_dir: Path) -> None:
        """A SEQ_CLS LoRA reward model trained on this base: LoRA -> adapter ``reward``, head -> linear."""
        config = saved_lora_as_causal(adapter_dir)
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
        head = {k: v for k, v in state.items() if any(f".{name}." in k for name in HEAD_KEYS)}
        lora = {k: v for k, v in state.items() if k not in head}
        weight = next((v for k, v in head.items() if k.endswith(".weight")), None)
        if weight is None or weight.shape[0] != 1:
            raise ValueError(f"{adapter_dir} holds no scalar score head")
        self.peft.add_adapter(REWARD, config)
        result = set_peft_model_state_dict(self.peft, lora, adapter_name=REWARD)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"reward adapter keys the base does not have: {unexpected[:3]}")
        bias = next((v for k, v in head.items() if k.endswith(".bias")), None)
        self.reward_head = nn.Linear(weight.shape[1], 1, bias=bias is not None)
        with torch.no_grad():
            self.reward_head.weight.copy_(weight.float())
            if bias is not None and self.reward_head.bias is not None:
                self.reward_head.bias.copy_(bias.float())
        self.reward_head.requires_grad_(False)
        self._frozen = [p for n, p in self.peft.named_parameters() if f".{REWARD}." in n]
        self._frozen += list(self.reward_head.parameters())
        self._activate(POLICY)

    def drop_reward_adapter(self) -> None:
        if REWARD in self.peft.peft_config:
            self.peft.delete_adapter(REWARD)
        self.reward_head = None
        self._frozen = []
        self._activate(POLICY)


def save_adapter(models: SharedBase, adapter: str, directory: Path) -> None:
    """One adapter's ``adapter_config.json`` + ``adapter_model.safetensors`` directly in ``directory``."""
    with tempfile.TemporaryDirectory() as tmp:
        models.peft.save_pretrained(tmp, selected_adapters=[adapter], safe_serialization=True)
        saved = Path(tmp) / adapter if (Path(tmp) / adapter / "adapter_config.json").exists() else Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for path in saved.iterdir():
            if path.is_file():
                shutil.copy2(path, directory / path.name)


def _load_adapter(models: SharedBase, adapter: str, directory: Path) -> None:
    result = set_peft_model_state_dict(models.peft, load_file(str(directory / "adapter_model.safetensors")),
                                       adapter_name=adapter)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise RuntimeError(f"checkpoint has {adapter} weights the model lacks: {unexpected[:3]}")


@dataclass
class SharedBaseWeights:
    """``workers.checkpoints.Weights`` for online RL: the policy adapter, and (``with_value``) the value
    adapter and head. The result archive is the policy alone."""

    models: SharedBase
    with_value: bool = True

    def write(self, directory: Path) -> None:
        save_adapter(self.models, POLICY, directory)
        if self.with_value and self.models.value_head is not None:
            save_adapter(self.models, VALUE, directory / VALUE)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.models.value_head.state_dict().items()},
                      str(directory / VALUE_HEAD_FILE))

    def restore(self, directory: Path) -> None:
        _load_adapter(self.models, POLICY, directory)
        if self.with_value and self.models.value_head is not None:
            _load_adapter(self.models, VALUE, directory / VALUE)
            head = load_file(str(directory / VALUE_HEAD_FILE))
            self.models.value_head.load_state_dict({k: v.to(self.models.value_head.weight.device)
                                                    for k, v in head.items()})
        self.models._activate(POLICY)
