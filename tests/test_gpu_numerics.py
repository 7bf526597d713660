"""CUDA numerics (opt-in: ``pytest -m gpu tests/test_gpu_numerics.py``; the default addopts deselect them;
``--noconftest`` where the service's packages are not installed, as on the GPU machine).

* bf16 autocast log-probs against fp32 ones on SmolLM2-135M (its weights when the model cache has
  them, else random-init from its config: model files do not travel to the GPU machine);
* the flex-attention layouts (DPO's shared prompt, packed rows) against the plain ones on CUDA, in
  the forward and, unlike on the CPU (no flex backward there), in the gradients;
* the chunked LM head's peak CUDA memory against the full-logits one for a 128K vocabulary.

Inputs are random token ids, so no tokenizer is needed either.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.paths import MODEL_CACHE
from workers.attention import use_flex
from workers.data import TokenizedPair, TokenizedSequence
from workers.logprobs import target_logps
from workers.packing import pack
from workers.pairs import PairLogps, collate_plain, collate_shared
from workers.token_logps import TokenLogps

#: no skipif: they are deselected by default (``-m 'not gpu'``); asked for without CUDA, they fail loudly
pytestmark = pytest.mark.gpu

#: SmolLM2-135M-Instruct's config.json (the architecture fields)
SMOLLM2_CONFIG: dict[str, Any] = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2,
}
CUDA = torch.device("cuda")


def smollm2() -> LlamaForCausalLM:
    directory = MODEL_CACHE / "SmolLM2-135M-Instruct"
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        model = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="sdpa")
    else:
        config = LlamaConfig(**SMOLLM2_CONFIG)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(CUDA).eval()  # type: ignore[no-any-return]


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (40 + 17 * i,), generator=generator).tolist()
        sides = [torch.randint(3, vocab, (length,), generator=generator).tolist()
                 for length in (25 + 9 * i, 60 - 7 * i)]
        seqs = [TokenizedSequence(prompt + side, [0] * len(prompt) + [1] * len(side)) for side in sides]
        pairs.append(TokenizedPair(seqs[0], seqs[1]))
    return pairs


def test_bf16_log_probs_track_fp32_on_smollm2() -> None:
    model = smollm2()
    pairs = random_pairs(4, model.config.vocab_size)
    batch = collate_plain(pairs, 2).to(CUDA)
    with torch.no_grad():
        fp32, counts = PairLogps(model)(batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16, _ = PairLogps(model)(batch)
    per_token = ((bf16 - fp32).abs() / counts).max()
    print(f"bf16 vs fp32: max per-token |difference| {float(per_token):.3e} nats, sums {fp32.tolist()}")
    assert bf16.dtype == torch.float32  # the head's log-softmax runs in fp32 under autocast
    assert float(per_token) < 0.05


def test_flex_shared_prompt_layout_equals_the_plain_layout_with_gradients() -> None:
    model = smollm2().float()
    flex_model = copy.deepcopy(model)
    use_flex(flex_model)
    pairs = random_pairs(4, model.config.vocab_size, seed=1)
    plain, _ = PairLogps(model)(collate_plain(pairs, 2).to(CUDA))
    flex, _ = PairLogps(flex_model)(collate_shared(pairs, 2, flex=True).to(CUDA))
    plain.sum().backward()
    flex.sum().backward()
    difference = float((flex - plain).abs().max())
    name = "model.layers.0.self_attn.q_proj.weight"
    g_plain, g_flex = model.get_parameter(name).grad, flex_model.get_parameter(name).grad
    assert g_plain is not None and g_flex is not None
    relative = float((g_flex - g_plain).norm() / g_plain.norm())
    print(f"shared_flex vs plain on CUDA: max |difference| {difference:.2e}, q_proj grad relative {relative:.2e}")
    assert difference < 1e-3 and relative < 1e-3  # TF32-free fp32; flex and SDPA sum in other orders


def test_flex_packed_rows_equal_padded_rows_with_gradients() -> None:
    from workers.batching import collate_supervised

    model = smollm2().float()
    flex_model = copy.deepcopy(model)
    use_flex(flex_model)
    examples = [s for p in random_pairs(6, model.config.vocab_size, seed=2) for s in (p.chosen, p.rejected)]
    padded = {k: v.to(CUDA) for k, v in collate_supervised(examples, 2).items()}
    packed = pack(examples, 256, 2, bucket=True).to(CUDA, flex=True)
    ours = TokenLogps(flex_model)(packed.input_ids, packed.attention_mask, packed.loss_mask,
                                  position_ids=packed.position_ids, rows=packed.documents)
    theirs = TokenLogps(model)(padded["input_ids"], padded["attention_mask"], padded["loss_mask"])
    n = len(examples)
    by_seq = torch.zeros(n, device=CUDA).index_add(0, ours.rows, ours.logps)
    ref_seq = torch.zeros(n, device=CUDA).index_add(0, theirs.rows, theirs.logps)
    by_seq.sum().backward()
    ref_seq.sum().backward()
    name = "model.layers.0.mlp.up_proj.weight"
    g_flex, g_plain = flex_model.get_parameter(name).grad, model.get_parameter(name).grad
    assert g_flex is not None and g_plain is not None
    relative = float((g_flex - g_plain).norm() / g_plain.norm())
    difference = float((by_seq - ref_seq).abs().max())
    print(f"packed_flex vs padded on CUDA: max |difference| {difference:.2e}, up_proj grad relative {relative:.2e}")
    assert difference < 1e-3 and relative < 1e-3


def test_chunked_head_peak_on_cuda_for_a_128k_vocabulary() -> None:
    config = LlamaConfig(vocab_size=128256, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(CUDA)
    tokens = 4096
    ids = torch.randint(0, config.vocab_size, (1, tokens + 1), device=CUDA)
    peaks = {}
    for mode in ("full", "chunked"):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids[:, :-1]).last_hidden_state[0]
            if mode == "chunked":
                logps = target_logps(hidden, model.lm_head, ids[0, 1:]).logps
            else:
                logits = model.lm_head(hidden).float()
                logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                del logits
        (-logps.mean()).backward()
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        del hidden, logps
    logits_bytes = tokens * config.vocab_size * 4
    print(f"CUDA peak above baseline: full {peaks['full']} B, chunked {peaks['chunked']} B "
          f"(one [tokens, V] fp32 tensor: {logits_bytes} B)")
    assert peaks["full"] - peaks["chunked"] > logits_bytes
