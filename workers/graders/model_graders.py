"""Model graders on a worker: ``run_model_grader(grader, sample, item, settings) -> dict``.

``score_model`` and ``label_model`` name an alignd base model; :class:`LocalModelRunner` loads it
once per process (safetensors, ``trust_remote_code=False``, local files only — via
``workers.base_models``), renders the grader's messages with the model's chat template and generates
greedily unless ``sampling_params.temperature`` > 0 (then with ``top_p`` and ``seed``, inside a forked
RNG so a training process's random state is untouched). Everything else — templates, the response
format, parsing scores and labels, OpenAI's error flags — is :mod:`service.graders`, the same code
the API runs; a ``multi`` grader's other graders (python ones in the sandbox) run here too.

The training recipe can call :func:`run_model_grader` in-process, or pass a
:class:`LocalModelRunner` (or its own runner sharing the policy's device) to ``service.graders.grade``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from service.graders import Generation, GenerationRequest, PromptTooLong, Sandbox, grade, make_sample
from service.graders.types import Grader
from service.settings import Settings
from workers.base_models import load_tokenizer, resolve_base_model

log = logging.getLogger("alignd.worker.graders")


class LocalModelRunner:
    """Generates grader completions with alignd base models, keeping the last ``capacity`` loaded."""

    def __init__(self, settings: Settings, capacity: int = 1, device: torch.device | None = None) -> None:
        self.settings = settings
        self.capacity = max(1, capacity)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._models: OrderedDict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = OrderedDict()
        self._lock = threading.Lock()

    def _load(self, name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        path = resolve_base_model(name, self.settings)
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False,
                                                     use_safetensors=True, local_files_only=True)
        model.to(self.device).eval()  # type: ignore[arg-type]
        tokenizer = load_tokenizer(path)
        self._models[name] = (model, tokenizer)
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)
        return model, tokenizer

    def __call__(self, request: GenerationRequest) -> Generation:
        with self._lock:  # one generation at a time per runner: models are not shared across threads
            model, tokenizer = self._load(request.model)
            ids = _prompt_ids(tokenizer, request.messages)
            limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
            if limit and len(ids) + request.max_new_tokens > limit:
                raise PromptTooLong(f"the grader prompt is {len(ids)} tokens; with max_completions_tokens "
                                    f"{request.max_new_tokens} it exceeds {request.model}'s context of {limit}")
            text, completion_tokens = self._generate(model, tokenizer, ids, request)
        return Generation(text=text, prompt_tokens=len(ids), completion_tokens=completion_tokens,
                          model=request.model)

    @torch.no_grad()
    def _generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int],
                  request: GenerationRequest) -> tuple[str, int]:
        sample = bool(request.temperature) and float(request.temperature or 0) > 0
        eos = _eos_ids(tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None))
        options: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "do_sample": sample,
                                   "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos or None}
        if sample:
            options.update(temperature=float(request.temperature or 1.0), top_p=float(request.top_p or 1.0),
                           top_k=0)
        else:  # greedy: clear sampling knobs a generation_config.json may carry
            options.update(temperature=None, top_p=None, top_k=None)
        input_ids = torch.tensor([ids], device=self.device)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if sample:
                torch.manual_seed(request.seed if request.seed is not None else 0)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),  # type: ignore[operator]
                                 **options)
        tokens = out[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        text = str(tokenizer.decode(tokens[:cut], skip_special_tokens=True))
        return text, cut + (1 if cut < len(tokens) else 0)


def _eos_ids(*values: Any) -> list[int]:
    """End-of-turn ids from the tokenizer and generation config (each an int, a list or None)."""
    ids: list[int] = []
    for value in values:
        for token in value if isinstance(value, list | tuple) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(str(rendered), add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return list(tokenizer(text)["input_ids"])


_RUNNERS: dict[str, LocalModelRunner] = {}
_RUNNERS_LOCK = threading.Lock()


def runner_for(settings: Settings) -> LocalModelRunner:
    """One runner (and its loaded models) per settings for the life of the worker process."""
    key = repr(settings)
    with _RUNNERS_LOCK:
        if key not in _RUNNERS:
            _RUNNERS[key] = LocalModelRunner(settings)
        return _RUNNERS[key]


def run_model_grader(grader: Grader | dict[str, Any], sample: str | dict[str, Any], item: Any,
                     settings: Settings) -> dict[str, Any]:
    """Grade one sample with a grader that may use a model; OpenAI's ``graders/run`` body (never raises)."""
    result = grade(grader, make_sample(sample) if isinstance(sample, str) else sample, item,
                   model_runner=runner_for(settings), sandbox=Sandbox.from_settings(settings.graders),
                   timeout=settings.graders.sample_timeout)
    return result.to_dict()
