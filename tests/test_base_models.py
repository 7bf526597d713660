"""Base-model registry and materialisation: built-ins, configured models, caching, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402

from service.model_registry import BUILTIN_MODELS, is_base_model, known_base_models  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.paths import MODEL_CACHE  # noqa: E402
from workers.base_models import (  # noqa: E402
    TINY_RANDOM_LLAMA,
    UnknownModelError,
    load_tokenizer,
    resolve_base_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IM_END = "<|im_end|>"


def make_settings(cache_dir: Path, models: dict[str, str] | None = None) -> Settings:
    """Settings whose model cache is ``cache_dir`` (and nothing else from the environment matters)."""
    base = Settings.from_env(cache_dir.parent / "alignd-data")
    return replace(base, model_cache_dir=cache_dir, models=dict(models or {}))


def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache per test session: the resolver's own caching shares it between test files."""
    return tmp_path_factory.getbasetemp() / "alignd-model-cache"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_base_model(TINY_RANDOM_LLAMA, make_settings(shared_cache(tmp_path_factory)))


# --------------------------------------------------------------------------- registry


def test_registry_lists_builtins_and_configured_models(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"mine": "/models/mine", "tiny-random-llama": "/elsewhere"})
    assert known_base_models(settings) == [*BUILTIN_MODELS, "mine"]
    assert is_base_model("SmolLM2-135M-Instruct", settings)
    assert is_base_model("mine", settings)
    assert not is_base_model("gpt-4o", settings)


def test_unknown_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="gpt-4o") as error:
        resolve_base_model("gpt-4o", make_settings(tmp_path))
    assert isinstance(error.value, ValueError)
    assert not (tmp_path / "gpt-4o").exists()


# --------------------------------------------------------------------------- tiny-random-llama


def test_tiny_model_is_identical_when_created_twice(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = resolve_base_model(TINY_RANDOM_LLAMA, make_settings(tmp_path / "cache"))
    assert again != tiny_model_dir
    first, second = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_tiny_model_is_a_plain_llama(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))


def test_tiny_model_has_smollm2_tokenizer_and_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.pad_token == IM_END and tokenizer.eos_token == IM_END
    stop = GenerationConfig.from_pretrained(tiny_model_dir).eos_token_id
    assert tokenizer.convert_tokens_to_ids(IM_END) in (stop if isinstance(stop, list) else [stop])


# --------------------------------------------------------------------------- configured models


def test_configured_local_directory_is_used_in_place(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"mine": str(tiny_model_dir)})
    assert resolve_base_model("mine", settings) == tiny_model_dir
    missing = make_settings(tmp_path, {"gone": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError):
        resolve_base_model("gone", missing)


def test_configured_s3_model_is_downloaded_once(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="weights")
        for file in tiny_model_dir.iterdir():
            client.upload_file(str(file), "weights", f"models/tiny/{file.name}")
        settings = make_settings(tmp_path / "cache", {"org/tiny": "s3://weights/models/tiny"})
        local = resolve_base_model("org/tiny", settings)
        assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
        weights = (local / "model.safetensors").read_bytes()
        assert weights == (tiny_model_dir / "model.safetensors").read_bytes()
        # A second resolve must come from the cache: the bucket is gone.
        for file in tiny_model_dir.iterdir():
            client.delete_object(Bucket="weights", Key=f"models/tiny/{file.name}")
        assert resolve_base_model("org/tiny", settings) == local
    assert AutoModelForCausalLM.from_pretrained(local).config.hidden_size == 64


# --------------------------------------------------------------------------- concurrency

_RESOLVER = textwrap.dedent(
    """
    import os, sys, time
    from dataclasses import replace
    from pathlib import Path
    import workers.base_models as bm
    from service.settings import Settings

    cache, log = Path(sys.argv[1]), Path(sys.argv[2])
    real_build = bm._create_tiny_random_llama

    def counted_build(out):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        real_build(out)

    bm._create_tiny_random_llama = counted_build
    settings = replace(Settings.from_env(cache.parent / "data"), model_cache_dir=cache, models={})
    # Start together: wait until both processes have paid their import time.
    (cache.parent / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(cache.parent.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    print(bm.resolve_base_model("tiny-random-llama", settings))
    """
)


def test_concurrent_resolve_builds_once(tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _RESOLVER, str(cache), str(log)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr[-2000:]
    paths = {stdout.strip().splitlines()[-1] for stdout, _ in results}
    assert paths == {str(cache / TINY_RANDOM_LLAMA)}
    assert len(log.read_text().split()) == 1, "only one process may build the model"
    assert sorted(p.name for p in cache.iterdir()) == [TINY_RANDOM_LLAMA, f"{TINY_RANDOM_LLAMA}.lock"]
    assert time.monotonic() - started < 300


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_is_converted_once_and_answers() -> None:
    """In the cache every test shares: a clean checkout converts here or in whichever test asks first
    (a cache of its own would convert the GGUF twice a run, ~20 s of CPU; building once under
    concurrent resolves is :func:`test_concurrent_resolve_builds_once`'s)."""
    settings = make_settings(MODEL_CACHE)
    path = resolve_base_model("SmolLM2-135M-Instruct", settings)
    started = time.monotonic()
    assert resolve_base_model("SmolLM2-135M-Instruct", settings) == path
    assert time.monotonic() - started < 1.0, "the second resolve must reuse the converted copy"

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32

    tokenizer = load_tokenizer(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)  # type: ignore[misc]
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
