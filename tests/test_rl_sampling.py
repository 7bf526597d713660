"""Group sampling (``workers.recipes.rl.sampling``) on tiny-random-llama: transformers' greedy tokens,
draws that follow the distribution ``generate(do_sample=True)`` samples from, for a fraction of the
prompt work."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from service.settings import Settings
from tests.conftest import MODEL_CACHE
from workers.batching import left_pad
from workers.data import prompt_ids
from workers.modeling import eos_token_ids, load_causal_lm
from workers.recipes.rl.sampling import categorical, sample_groups, top_p_filter

TINY = "tiny-random-llama"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from workers.base_models import load_tokenizer, resolve_base_model

    settings = replace(Settings.from_env(tmp_path_factory.mktemp("s")), model_cache_dir=MODEL_CACHE)
    path = resolve_base_model(TINY, settings)
    return load_causal_lm(Path(path)).eval(), load_tokenizer(path)


def prompts(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [prompt_ids([{"role": "user", "content": q}], tokenizer, 64)
            for q in ("What is 2 plus 2?", "Hi", "Name a colour, please.")]
    return left_pad(rows, tokenizer.pad_token_id)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_categorical_draws_follow_the_distribution_and_never_a_zero() -> None:
    """The inverse-CDF draw against the probabilities it is given: 20,000 draws of each row land within
    5 standard errors of every probability, a token of probability 0 (cut by ``top_p``) is never drawn,
    and one seed draws the same tokens again."""
    table = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.25, 0.0, 0.5, 0.25]])
    n = 20_000
    probs = table.repeat_interleave(n, dim=0)
    torch.manual_seed(11)
    drawn = categorical(probs)
    torch.manual_seed(11)
    assert torch.equal(categorical(probs), drawn)
    for row, expected in enumerate(table):
        counts = torch.bincount(drawn[row * n:(row + 1) * n], minlength=5).double() / n
        error = (expected.double() * (1 - expected.double()) / n).sqrt()
        assert bool(((counts - expected.double()).abs() <= 5 * error + 1e-12).all()), (row, counts.tolist())
        assert bool((counts[expected == 0] == 0).all())
    # a huge vocabulary whose tail is cut: only the kept head is ever drawn
    logits = torch.randn(64, 49152, generator=torch.Generator().manual_seed(2))
    cut = top_p_filter(logits / 0.5, 0.3)
    kept = torch.isfinite(cut)
    wide = categorical(cut.softmax(dim=-1))
    assert bool(kept.gather(1, wide[:, None]).all())


def test_group_samples_follow_the_models_distribution(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """The first sampled token of 2,000 rows of one prompt against the model's own next-token
    distribution after transformers' ``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` (what
    ``generate(do_sample=True)`` samples from): the favourite's frequency and those of four rank bins
    of the rest within 5 standard errors, and no token outside the nucleus."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    model, tokenizer = tiny
    queries, mask = prompts(tokenizer)
    queries, mask = queries[1:2], mask[1:2]
    # a random model's logits: one clear favourite over a flat tail; the nucleus keeps it and ~90 others
    temperature, top_p, rows = 0.1, 0.5, 2000
    with torch.no_grad():
        logits = model(input_ids=queries, attention_mask=mask).logits[:, -1].float()
    warped = TopPLogitsWarper(top_p)(queries, TemperatureLogitsWarper(temperature)(queries, logits))
    expected = warped.softmax(dim=-1)[0].double()
    assert 0.2 < float(expected.max()) < 0.9 and int((expected > 0).sum()) > 10  # a real distribution, cut
    torch.manual_seed(4)
    samples = sample_groups(model, queries, mask, group_size=rows, max_new_tokens=1, temperature=temperature,
                            top_p=top_p, eos_ids=[-1], pad_token_id=tokenizer.pad_token_id)
    first = samples.responses[:, 0]
    assert bool((expected[first] > 0).all())
    counts = torch.bincount(first, minlength=expected.shape[0]).double() / rows
    # the favourite, then the rest of the nucleus in four bins by rank (each bin expects dozens of draws)
    order = expected.argsort(descending=True)[:int((expected > 0).sum())]
    bins = [order[:1], *order[1:].tensor_split(4)]
    for members in bins:
        want, got = float(expected[members].sum()), float(counts[members].sum())
        assert abs(got - want) <= 5 * math.sqrt(want * (1 - want) / rows), (want, got)


def test_sampled_groups_end_at_their_end_of_turn_token(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """Every row has 1..max_new_tokens real tokens; a row that stopped ends in an end-of-turn token and
    has padding only after it; a row that did not stop is exactly max_new_tokens long."""
    model, tokenizer = tiny
    queries, mask = prompts(tokenizer)
    eos = eos_token_ids(model, tokenizer)
    new = 12
    torch.manual_seed(3)
    samples = sample_groups(model, queries, mask, group_size=4, max_new_tokens=new, temperature=1.5, top_p=1.0,
                            eos_ids=eos, pad_token_id=tokenizer.pad_token_id)
    assert samples.responses.shape[0] == 12
    lengths = samples.mask.sum(dim=1)
    assert bool((lengths >= 1).all()) and bool((lengths <= new).all())
    for row, n, stopped in zip(samples.responses, lengths.tolist(), samples.has_eos.tolist(), strict=True):
        assert (int(row[n - 1]) in eos) == stopped
        assert stopped or n == new
        assert bool((row[n:] == tokenizer.pad_token_id).all())


def test_each_prompt_runs_through_the_model_once(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """The prefill sees B rows of P tokens, not B*G; every later forward is one token per row."""
    model, tokenizer = tiny
    queries, mask = prompts(tokenizer)
    shapes: list[tuple[int, int]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        torch.manual_seed(0)
        samples = sample_groups(model, queries, mask, group_size=8, max_new_tokens=5, temperature=1.0, top_p=1.0,
                                eos_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert shapes[0] == tuple(queries.shape)  # (3, P): once per prompt
    assert all(shape == (24, 1) for shape in shapes[1:])
    assert len(shapes) == samples.responses.shape[1]  # stops after the last token it needs


def test_should_stop_ends_sampling_early(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    queries, mask = prompts(tokenizer)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 2

    samples = sample_groups(model, queries, mask, group_size=2, max_new_tokens=50, temperature=1.0, top_p=1.0,
                            eos_ids=[-1], pad_token_id=tokenizer.pad_token_id, should_stop=stop)
    assert samples.stopped and samples.responses.shape[1] == 2


@pytest.mark.parametrize("group", [1, 3])
def test_the_static_cache_gives_the_dynamic_caches_greedy_tokens(
        tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], group: int) -> None:
    """The CUDA path's cache (``StaticCache``, full-width mask filled in place) against the CPU path's,
    and both against transformers' own greedy ``generate``."""
    model, tokenizer = tiny
    queries, mask = prompts(tokenizer)
    eos = eos_token_ids(model, tokenizer)
    kwargs = {"group_size": group, "max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0, "eos_ids": eos,
              "pad_token_id": tokenizer.pad_token_id, "greedy": True}
    dynamic = sample_groups(model, queries, mask, cache="dynamic", **kwargs)  # type: ignore[arg-type]
    static = sample_groups(model, queries, mask, cache="static", **kwargs)  # type: ignore[arg-type]
    assert torch.equal(static.responses, dynamic.responses)
    assert torch.equal(static.mask, dynamic.mask) and torch.equal(static.has_eos, dynamic.has_eos)
    config = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)
    with torch.no_grad():
        out = model.generate(input_ids=queries, attention_mask=mask, generation_config=config)
    theirs = out[:, queries.shape[1]:].repeat_interleave(group, dim=0)
    width = min(theirs.shape[1], static.responses.shape[1])
    assert torch.equal(static.responses[:, :width], theirs[:, :width])
    # sampled under one seed the two caches draw the same tokens too (a random model's greedy answer is dull)
    kwargs |= {"greedy": False, "temperature": 0.8}
    torch.manual_seed(5)
    dynamic = sample_groups(model, queries, mask, cache="dynamic", **kwargs)  # type: ignore[arg-type]
    torch.manual_seed(5)
    static = sample_groups(model, queries, mask, cache="static", **kwargs)  # type: ignore[arg-type]
    assert torch.equal(static.responses, dynamic.responses)
    assert len({tuple(r) for r in static.responses.tolist()}) > 1  # rows differ: a real comparison


def test_auto_picks_the_static_cache_on_cuda_only() -> None:
    from workers.recipes.rl.sampling import cache_kind

    assert cache_kind(torch.device("cpu")) == "dynamic"
    assert cache_kind(torch.device("cuda", 0)) == "static"
    assert cache_kind(torch.device("cpu"), "static") == "static"


@pytest.mark.gpu
def test_on_cuda_the_compiled_static_decode_gives_the_dynamic_caches_tokens(
        tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tokenizer = tiny
    model = model.to("cuda")
    queries, mask = (t.to("cuda") for t in prompts(tokenizer))
    kwargs = {"group_size": 2, "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "greedy": True,
              "eos_ids": eos_token_ids(model, tokenizer), "pad_token_id": tokenizer.pad_token_id}
    dynamic = sample_groups(model, queries, mask, cache="dynamic", **kwargs)  # type: ignore[arg-type]
    compiled = sample_groups(model, queries, mask, cache="auto", **kwargs)  # type: ignore[arg-type]
    assert not model.__dict__.get("_alignd_compile_failed")
    assert torch.equal(compiled.responses, dynamic.responses)
    model.to("cpu")
