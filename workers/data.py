"""Dataset normalisation and tokenization shared by every training method (prompts for sampling included).

There is exactly one tokenization path so that SFT, reward modelling, DPO and PPO agree on what a
prompt and a completion are:

* Conversations are rendered with the tokenizer's own chat template (``apply_chat_template``,
  ``tokenize=False``) and the rendered text is tokenized with ``add_special_tokens=False`` (the
  template already writes BOS / end-of-turn tokens, so nothing is doubled).
* Which tokens are trained is found by rendering *prefixes* of the conversation (the history, the
  history plus the assistant header from ``add_generation_prompt=True``, the history plus the
  assistant turn) and diffing the token lists. That works for any template whose prefixes render
  consistently, and the trained span is exactly the assistant's content plus its end-of-turn
  token(s) — never the ``<|im_start|>assistant\\n`` header, never the ``\\n`` a template writes
  after ``<|im_end|>``.
* Each rendered prefix must be a *text* prefix of the next, else :class:`ChatTemplateError`. In the
  usual case its tokens are also a token prefix of the full rendering and we cut the full token
  list there. When a BPE merge straddles the boundary (e.g. an assistant message that starts with
  ``"\\n"`` right after the header's ``"\\n"``), we keep the prefix's tokens as they are and tokenize
  the rest on its own — that is the sequence the model sees at generation time, when the prompt
  is tokenized alone and the completion is generated after it.

Masks follow one convention everywhere: ``loss_mask[t] == 1`` marks token ``t`` as a *target* at its
own position. No shift is applied here; consumers compare ``input_ids[:, t]`` with the logits at
``t - 1`` (``logits[:, :-1]`` against ``input_ids[:, 1:]`` masked by ``loss_mask[:, 1:]``), which is
also what Hugging Face models do internally with ``labels``. Position 0 is never a target.

Truncation (``max_length`` tokens):

* preference pairs keep the completion: the prompt loses tokens from its left first, but keeps at
  least ``min(min_prompt_tokens, max_length // 2)`` of its last tokens (the assistant header and
  the end of the question, so the first completion token has something to be predicted from);
  only if the completion alone does not fit is its end cut. Chosen and rejected keep the same
  number of prompt tokens so both are scored under the same context.
* supervised conversations are cut on the right (the start of a chat is the context for the rest).

Every tokenized sequence records ``truncated`` so recipes can count and report it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Message = dict[str, Any]

ROLES = frozenset({"system", "user", "assistant"})
IGNORE_INDEX = -100
#: Prompt tokens kept at least when a preference example is too long (see the module docstring).
MIN_PROMPT_TOKENS = 16


class ChatTemplateError(ValueError):
    """The chat template renders a conversation prefix inconsistently with the whole."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PreferencePair:
    """One preference example in a single shape, whatever format the dataset line used.

    ``chosen``/``rejected`` end with the assistant message whose tokens enter the loss; any messages
    before it are treated as extra context on that side (not trained).
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None


@dataclass(frozen=True)
class TokenizedSequence:
    """Token ids with a 0/1 ``loss_mask`` marking the tokens to train on (targets at their own index)."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def completion_mask(self) -> list[int]:
        """Alias used by preference code: the completion is exactly the trained span."""
        return self.loss_mask

    @property
    def labels(self) -> list[int]:
        """Hugging Face style labels: the token where trained, ``-100`` elsewhere."""
        pairs = zip(self.input_ids, self.loss_mask, strict=True)
        return [token if keep else IGNORE_INDEX for token, keep in pairs]


#: A tokenized supervised conversation has the same shape as one side of a pair.
TokenizedExample = TokenizedSequence


@dataclass(frozen=True)
class TokenizedPair:
    """Chosen and rejected sequences of one preference example."""

    chosen: TokenizedSequence
    rejected: TokenizedSequence
    margin: float | None = None

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    def __len__(self) -> int:
        """The longer side: what a length-bucketing sampler should group by."""
        return max(len(self.chosen), len(self.rejected))


# --------------------------------------------------------------------------- normalisation


def normalize_preference(example: Mapping[str, Any]) -> PreferencePair:
    """Read an OpenAI (``input``/``preferred_output``/``non_preferred_output``) or TRL
    (``prompt``/``chosen``/``rejected``, strings or message lists, prompt optional) preference line.

    Without a prompt, ``chosen`` and ``rejected`` must be full conversations; their longest shared
    message prefix becomes the prompt (TRL's "implicit prompt").
    """
    if "preferred_output" in example or "input" in example:
        prompt = _openai_prompt(example.get("input"))
        chosen = _messages(_required(example, "preferred_output"), "assistant")
        rejected = _messages(_required(example, "non_preferred_output"), "assistant")
    elif "chosen" in example and "rejected" in example:
        prompt, chosen, rejected = _trl_preference(example)
    else:
        raise ValueError(
            "a preference example needs input/preferred_output/non_preferred_output "
            "or prompt/chosen/rejected"
        )
    _check_preference(prompt, chosen, rejected)
    return PreferencePair(prompt, chosen, rejected, _margin(example.get("margin")))


def normalize_supervised(example: Mapping[str, Any]) -> list[Message]:
    """Read a supervised line: ``{"messages": [...]}`` or ``{"prompt", "completion"}``.

    Assistant messages keep their optional ``weight`` (0 = context only, anything else = trained).
    """
    if "messages" in example:
        messages = _messages(example["messages"], None)
    elif "prompt" in example and "completion" in example:
        messages = _messages(example["prompt"], "user") + _messages(example["completion"], "assistant")
    else:
        raise ValueError("a supervised example needs messages, or prompt and completion")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a supervised example needs at least one assistant message")
    if messages[0]["role"] == "assistant":
        raise ValueError("a conversation cannot start with an assistant message")
    return messages


def _openai_prompt(value: Any) -> list[Message]:
    if not isinstance(value, Mapping) or "messages" not in value:
        raise ValueError("input must be an object with messages")
    return _messages(value["messages"], None)


def _trl_preference(example: Mapping[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    prompt_value = example.get("prompt")
    if prompt_value not in (None, "", []):
        prompt = _messages(prompt_value, "user")
        return prompt, _messages(example["chosen"], "assistant"), _messages(example["rejected"], "assistant")
    if isinstance(example["chosen"], str) or isinstance(example["rejected"], str):
        raise ValueError("string chosen/rejected need a prompt; only conversations carry an implicit one")
    return split_shared_prompt(_messages(example["chosen"], None), _messages(example["rejected"], None))


def split_shared_prompt(
    chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """Longest shared message prefix of two conversations, leaving each at least one message."""
    limit = min(len(chosen), len(rejected)) - 1
    shared = 0
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError("chosen and rejected share no prompt messages and no prompt was given")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_preference(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> None:
    if not prompt:
        raise ValueError("the prompt is empty")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1]["role"] != "assistant":
            raise ValueError(f"{name} must end with an assistant message")


def _messages(value: Any, string_role: str | None) -> list[Message]:
    """A message list from a list, a single message object, or (when allowed) a bare string."""
    if isinstance(value, str):
        if string_role is None:
            raise ValueError("expected a list of messages, got a string")
        return [{"role": string_role, "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of messages")
    return [_message(item) for item in value]


#: OpenAI's newer name for the system role (RFT lines use it); chat templates know only "system".
ROLE_ALIASES = {"developer": "system"}


def _message(raw: Any) -> Message:
    if not isinstance(raw, Mapping):
        raise ValueError("each message must be an object")
    role = ROLE_ALIASES.get(raw.get("role"), raw.get("role"))  # type: ignore[arg-type]
    if role not in ROLES:
        raise ValueError(f"unsupported role {role!r}; expected one of {sorted(ROLES)}")
    message: Message = {"role": role, "content": _text(raw.get("content"))}
    if "weight" in raw:
        weight = raw["weight"]
        if role != "assistant" or isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError("weight is a number and only allowed on assistant messages")
        message["weight"] = weight
    return message


def _text(content: Any) -> str:
    """Message content as text: a string, or OpenAI's list of ``{"type": "text", "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise ValueError("message content must be a string or a list of text parts")


def _required(example: Mapping[str, Any], key: str) -> Any:
    if key not in example:
        raise ValueError(f"missing {key}")
    return example[key]


def _margin(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("margin must be a number")
    return float(value)


# --------------------------------------------------------------------------- rendering


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> str:
    """Chat-template text; only role and content reach the template (``weight`` is ours)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise ChatTemplateError("apply_chat_template(tokenize=False) did not return text")
    return text


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def encode_segments(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each piece between consecutive renderings ``texts`` (each a prefix of the next).

    Cuts the full rendering's token list at each prefix's token count while the prefix tokens match
    it; from the first boundary a BPE merge straddles, tokenizes the remaining pieces on their own.
    """
    full_ids = _encode(tokenizer, texts[-1]) if texts else []
    pieces: list[list[int]] = []
    previous_text, cut = "", 0
    aligned = True
    for text in texts:
        if not text.startswith(previous_text):
            raise ChatTemplateError(
                "the chat template renders a conversation prefix that is not a prefix of the "
                f"longer conversation: {previous_text[-80:]!r} vs {text[:len(previous_text)][-80:]!r}"
            )
        if aligned:
            ids = _encode(tokenizer, text)
            if len(ids) >= cut and full_ids[: len(ids)] == ids:
                pieces.append(full_ids[cut : len(ids)])
                previous_text, cut = text, len(ids)
                continue
            aligned = False
            logger.debug("a token straddles char %d; tokenizing the rest piecewise", len(previous_text))
        pieces.append(_encode(tokenizer, text[len(previous_text) :]))
        previous_text = text
    return pieces


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def trailing_template_whitespace(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> int:
    """How many whitespace-only tokens end ``ids`` right after a special token (e.g. ``<|im_end|>\\n``).

    That newline is template formatting between turns, not something the assistant should learn to
    emit; whitespace the assistant wrote itself (not after a special token) is left alone.
    """
    special = _special_ids(tokenizer)
    count = 0
    while count < len(ids):
        token = ids[len(ids) - 1 - count]
        if token in special or str(tokenizer.decode([token])).strip():
            break
        count += 1
    if count and count < len(ids) and ids[len(ids) - 1 - count] in special:
        return count
    return 0


# --------------------------------------------------------------------------- preference


def tokenize_preference(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    min_prompt_tokens: int = MIN_PROMPT_TOKENS,
) -> TokenizedPair | None:
    """Tokenize both sides as prompt (with generation header) + final assistant turn.

    Returns None when no completion token would remain (see the module docstring for truncation).
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    prompt_c, completion_c = _prompt_and_completion(tokenizer, pair.prompt, pair.chosen)
    prompt_r, completion_r = _prompt_and_completion(tokenizer, pair.prompt, pair.rejected)
    if not completion_c or not completion_r:
        return None
    keep = _prompt_tokens_to_keep(max_length, max(len(completion_c), len(completion_r)), min_prompt_tokens)
    chosen = _fit(prompt_c, completion_c, keep, max_length)
    rejected = _fit(prompt_r, completion_r, keep, max_length)
    if chosen is None or rejected is None:
        return None
    return TokenizedPair(chosen, rejected, pair.margin)


def _prompt_and_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: list[Message], side: list[Message]
) -> tuple[list[int], list[int]]:
    """Tokens of the context with the assistant header, and of the final assistant turn.

    The completion is the full rendering minus the prompt rendering: the assistant content plus
    the end-of-turn token(s) once, without the whitespace the template writes after them.
    """
    context = prompt + side[:-1]
    texts = [_render(tokenizer, context, True), _render(tokenizer, context + side[-1:], False)]
    prompt_ids, completion_ids = encode_segments(tokenizer, texts)
    trim = trailing_template_whitespace(tokenizer, completion_ids)
    return prompt_ids, completion_ids[: len(completion_ids) - trim]


def _prompt_tokens_to_keep(max_length: int, longest_completion: int, min_prompt_tokens: int) -> int:
    floor = max(1, min(min_prompt_tokens, max_length // 2))
    return max(max_length - longest_completion, floor)


def _fit(prompt: list[int], completion: list[int], keep: int, max_length: int) -> TokenizedSequence | None:
    kept_prompt = prompt[-keep:] if len(prompt) > keep else prompt
    kept_completion = completion[: max_length - len(kept_prompt)]
    if not kept_completion or not kept_prompt:
        return None
    truncated = len(kept_prompt) < len(prompt) or len(kept_completion) < len(completion)
    return TokenizedSequence(
        input_ids=kept_prompt + kept_completion,
        loss_mask=[0] * len(kept_prompt) + [1] * len(kept_completion),
        truncated=truncated,
    )


# --------------------------------------------------------------------------- supervised


def tokenize_supervised(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedExample | None:
    """Tokenize a conversation, training every assistant turn whose ``weight`` is not 0.

    Trained: the assistant's content and its end-of-turn token(s). Not trained: system and user
    turns, assistant headers, weight-0 turns, template whitespace between turns. Cut on the right
    at ``max_length``; None when no trained token remains.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    texts, trained = _supervised_boundaries(tokenizer, messages)
    input_ids: list[int] = []
    loss_mask: list[int] = []
    for piece, train in zip(encode_segments(tokenizer, texts), trained, strict=True):
        n_train = (len(piece) - trailing_template_whitespace(tokenizer, piece)) if train else 0
        input_ids += piece
        loss_mask += [1] * n_train + [0] * (len(piece) - n_train)
    # The sequence ends at the last end-of-turn token, exactly like a preference completion.
    end = len(input_ids) - trailing_template_whitespace(tokenizer, input_ids)
    input_ids, loss_mask = input_ids[:end], loss_mask[:end]
    truncated = len(input_ids) > max_length
    input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    if loss_mask:
        loss_mask[0] = 0  # nothing predicts the first token
    if not any(loss_mask):
        return None
    return TokenizedSequence(input_ids, loss_mask, truncated)


def _supervised_boundaries(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message]
) -> tuple[list[str], list[bool]]:
    """Renderings after each message (and after each assistant header), and which piece is trained."""
    if not messages or messages[0]["role"] == "assistant":
        raise ValueError("a conversation must start with a system or user message")
    texts: list[str] = []
    trained: list[bool] = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            texts.append(_render(tokenizer, messages[:index], True))
            trained.append(False)
        texts.append(_render(tokenizer, messages[: index + 1], False))
        trained.append(message["role"] == "assistant" and message.get("weight", 1) != 0)
    return texts, trained


# --------------------------------------------------------------------------- prompts (PPO, RL, generation)


def normalize_prompt(row: Mapping[str, Any]) -> list[Message]:
    """A prompts-file line (``{"messages": [...]}`` ending in a user turn, or ``{"prompt": ...}``) as
    messages, read exactly like a preference example's prompt. Extra fields (what graders read) are ignored."""
    value = row["messages"] if "messages" in row else row["prompt"]
    return normalize_preference({"prompt": value, "chosen": ".", "rejected": "."}).prompt


def prompt_ids(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[int]:
    """Chat template + assistant header (as a preference prompt renders), left-truncated to ``max_tokens``."""
    return _encode(tokenizer, _render(tokenizer, list(messages), True))[-max_tokens:]

