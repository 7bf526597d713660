"""Chunked target log-probs (``workers.logprobs``) against the full-logits computation.

* values, argmax hits, entropies and gradients (to the hidden states and to the head) equal the
  unchunked ``log_softmax(head(h) / T).gather`` path for chunk sizes that do and do not divide the
  token count;
* a large-vocabulary model (a tiny Llama with Llama-3's 128,256 tokens) trains a step with a lower
  peak: measured in a fresh child process from ``VmHWM``, the unchunked step's peak exceeds the
  chunked one's by at least two ``[tokens, V]`` fp32 tensors (the logits and their softmax kept for the
  backward), which the chunked step never holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from tests.conftest import REPO
from workers.logprobs import chunk_tokens, target_logps
from workers.recipes.rl.core import entropy_from_logits


def reference(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, temperature: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logits.argmax(-1) == targets, entropy


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_and_gradients_equal_the_full_logits_path(chunk: int, temperature: float) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 301, bias=False)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    targets = torch.randint(0, 301, (3, 7))
    weights = torch.randn(3, 7)  # an arbitrary loss, so every token's gradient differs
    ref_logps, ref_correct, ref_entropy = reference(hidden, head, targets, temperature)
    (ref_logps * weights).sum().backward()
    ref_grads = hidden.grad.clone(), head.weight.grad.clone()  # type: ignore[union-attr]
    hidden.grad, head.weight.grad = None, None
    out = target_logps(hidden, head, targets, temperature=temperature, with_correct=True, with_entropy=True,
                       chunk=chunk)
    (out.logps * weights).sum().backward()
    torch.testing.assert_close(out.logps, ref_logps, rtol=0, atol=1e-5)
    assert out.correct is not None and torch.equal(out.correct, ref_correct)
    assert out.entropy is not None
    # the old unchunked path's entropy (PPO's metric) to 1e-5; -sum p log p differs in rounding only
    torch.testing.assert_close(out.entropy, entropy_from_logits(head(hidden).float() / temperature).detach(),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref_entropy.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(head.weight.grad, ref_grads[1], rtol=0, atol=1e-5)


def test_chunks_are_sized_by_the_vocabulary() -> None:
    assert chunk_tokens(128_256) == 2**25 // 128_256 == 261
    assert chunk_tokens(10, budget=100) == 10 and chunk_tokens(1000, budget=100) == 1


CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from workers.logprobs import target_logps
    from workers.memory import peak_rss, reset_peak_rss, current_rss

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    results = []
    for run, (mode, tokens) in enumerate(json.loads(sys.argv[1])):
        ids = torch.randint(0, config.vocab_size, (1, tokens + 1))
        # the measured step runs with every lazy allocation (the grads, kept by zero_grad) done: one
        # unmeasured step before the first run is enough ([chunk, V] and larger buffers are mmapped
        # and go back to the system when freed, so no run inherits another's)
        for warm in ((True, False) if run == 0 else (False,)):
            model.zero_grad(set_to_none=False)
            if not warm:
                assert reset_peak_rss()
                base = current_rss()
            hidden = model.model(input_ids=ids[:, :-1]).last_hidden_state[0]
            if mode == "chunked":
                logps = target_logps(hidden, model.lm_head, ids[0, 1:]).logps
            else:
                logits = model.lm_head(hidden).float()
                logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                del logits
            (-logps.mean()).backward()
            del hidden, logps
        results.append({"peak": peak_rss() - base, "grad": float(model.lm_head.weight.grad.norm())})
    print(json.dumps(results))
""")


def measured_peaks(runs: list[tuple[str, int]]) -> list[dict[str, float]]:
    """Peak RSS above the step's starting RSS, each run in turn in one fresh child (``VmHWM`` reset per run;
    the unchunked run goes last, so its freed gigabytes are in no other run's baseline)."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(runs)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_chunked_step_has_a_lower_peak_for_a_large_vocabulary() -> None:
    """Unchunked, the step holds the logits, their log-softmax and its gradient: ~3 ``[tokens, V]``
    fp32 tensors. Chunked, a few ``[chunk, V]`` ones (the backward's recomputation), whatever the
    token count."""
    tokens, vocab = 1024, 128_256
    logits_bytes = tokens * vocab * 4  # one [tokens, V] fp32 tensor: 525 MB
    chunked, longer, full = measured_peaks([("chunked", tokens), ("chunked", 2 * tokens), ("full", tokens)])
    print(f"peak above baseline at {tokens} tokens: unchunked {full['peak']:.0f} B, chunked {chunked['peak']:.0f} B "
          f"({longer['peak']:.0f} B at {2 * tokens}); one [tokens, V] fp32 tensor {logits_bytes} B")
    assert full["peak"] > 2.5 * logits_bytes
    assert full["peak"] - chunked["peak"] > logits_bytes
    # twice the tokens: at most the [tokens, H]-sized activations more, never another [tokens, V]
    assert longer["peak"] - chunked["peak"] < 0.1 * logits_bytes
