"""A trained reward model in use: loading a reward-model job's archive as a scorer, and scoring texts.

One place loads a reward model for inference — PPO (when it cannot share the policy's base) and
``generate_preferences``' judge both go through :func:`load_reward_model_ref` — and one forward
defines what a reward is (:class:`SequenceScores`, which the reward-model recipe trains through):
the scalar head applied to the last hidden state of the last *attended* token of prompt + completion
(the completion's end-of-turn token). The position comes from the attention mask, not from
``pad_token_id``: SmolLM2 pads with ``<|im_end|>``, which is also the token every sequence ends with,
so transformers' own pooling would pick the token before it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers import batching as B
from workers import data as D
from workers.archives import fetch_adapter
from workers.base_models import load_tokenizer, resolve_base_model
from workers.context import JobContext, ModelRef
from workers.modeling import load_classifier_base, load_sequence_classifier

#: Names transformers gives a sequence classifier's head (Llama & most decoders: ``score``).
HEAD_NAMES = ("score", "classifier")


def classifier_of(model: nn.Module) -> PreTrainedModel:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner  # type: ignore[return-value]


def score_head(classifier: nn.Module) -> nn.Module:
    for name in HEAD_NAMES:
        head = getattr(classifier, name, None)
        if isinstance(head, nn.Module):
            return head
    names = " or ".join(HEAD_NAMES)
    raise ValueError(f"{type(classifier).__name__} has no classification head named {names}")


class SequenceScores(nn.Module):
    """``forward(input_ids, attention_mask) -> [B]`` fp32 rewards at each row's last attended token.

    The head runs on those B hidden states only. A module so that accelerate/DDP wraps the whole
    computation (DDP syncs gradients only through the wrapper).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Any, position_ids: Tensor | None = None,
                last: Tensor | None = None) -> Tensor:
        """Packed rows (``workers.packing``): ``attention_mask`` None or a document ``BlockMask``,
        ``position_ids`` restarting per sequence and ``last`` the flat index of each sequence's last
        token; one reward per sequence, in ``last``'s order."""
        classifier = classifier_of(self.model)
        decoder = getattr(classifier, classifier.base_model_prefix)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids).last_hidden_state
        if last is not None:
            pooled = hidden.flatten(0, 1).index_select(0, last)
        else:
            ends = attention_mask.sum(dim=1) - 1  # right padding
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]
        return score_head(classifier)(pooled).squeeze(-1).float()  # type: ignore[no-any-return]


def load_reward_model(base_dir: str | Path, adapter_dir: str | Path, *,
                      parent_adapter_dirs: Sequence[str | Path] = (), dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A reward model job's archive (extracted to ``adapter_dir``) as an eval-mode classifier.

    ``base_dir`` is the job's base model directory; ``parent_adapter_dirs`` the extracted archives of
    the fine-tunes it was chained on, oldest first (empty for a plain base). A LoRA adapter (and its
    head) is merged into the weights; a full archive holds every weight and its tokenizer and is
    loaded as it is (parents ignored). Nothing requires grad.
    """
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").exists():
        tokenizer = load_tokenizer(base_dir)
        model = load_classifier_base(Path(base_dir), dtype, tokenizer.pad_token_id, None, [],
                                     parent_dirs=[Path(p) for p in parent_adapter_dirs])
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    else:
        tokenizer = load_tokenizer(adapter_dir)
        model = load_sequence_classifier(adapter_dir, dtype, tokenizer.pad_token_id)
    model.requires_grad_(False).eval().to(device)
    return model, tokenizer


def load_reward_model_ref(ctx: JobContext, ref: ModelRef, *, dtype: torch.dtype, device: torch.device
                          ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The reward-model job behind ``ref`` (resolved by the runner), fetched from the store and loaded."""
    directory = Path(tempfile.mkdtemp(dir=ctx.workdir))
    adapter_dir = fetch_adapter(ctx.store, ref.adapter_key, directory / "reward")
    parents = [fetch_adapter(ctx.store, key, directory / f"parent-{i}")
               for i, key in enumerate(ref.parent_adapter_keys)]
    return load_reward_model(resolve_base_model(ref.base_model, ctx.settings), adapter_dir,
                             parent_adapter_dirs=parents, dtype=dtype, device=device)


Conversation = str | list[dict[str, Any]]


@torch.no_grad()
def score(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
          prompts_and_responses: Sequence[tuple[Conversation, Conversation]], *, batch_size: int = 8,
          max_length: int = 1024) -> Tensor:
    """Rewards ``[N]`` (fp32, on the CPU) for ``(prompt, response)`` pairs, tokenised as in training.

    A prompt is a user string or a message list; a response an assistant string or message list
    (its last message is what is scored). Long inputs are truncated as training truncates them.
    """
    sequences = [_tokenize_scored(prompt, response, tokenizer, max_length)
                 for prompt, response in prompts_and_responses]
    scorer = SequenceScores(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = B.collate_supervised(sequences[start:start + batch_size], tokenizer.pad_token_id)
        out.append(scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _tokenize_scored(prompt: Conversation, response: Conversation, tokenizer: PreTrainedTokenizerBase,
                     max_length: int) -> D.TokenizedSequence:
    example = {"prompt": prompt, "chosen": response, "rejected": response}
    tokenized = D.tokenize_preference(D.normalize_preference(example), tokenizer, max_length)
    if tokenized is None:
        raise ValueError(f"nothing of the response fits in max_length={max_length}")
    return tokenized.chosen


__all__ = ["SequenceScores", "classifier_of", "load_reward_model", "load_reward_model_ref", "score", "score_head"]
