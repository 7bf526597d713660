"""``service/resources.py``'s estimate against the peak memory the recipes really use, on the CPU.

``bench/memory_estimate.py`` runs each case's real recipe for two steps in a fresh process on
SmolLM2-135M's architecture (random weights: 0.54 GB in fp32, far above the noise) and measures the
peak RSS above the RSS after every import; the estimate is asked for the CPU's precision. The
estimate must stay within ±20 % of that measurement for LoRA and full fine-tunes.
"""

from __future__ import annotations

import pytest

CASES = ["sft:full", "dpo:lora", "ppo:lora"]  # a full fine-tune's state, a reference pass, four roles


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES)
def test_the_estimate_is_within_20_percent_of_the_measured_cpu_peak(case: str) -> None:
    from bench.memory_estimate import model_dir, run

    model_dir()
    out = run(case, steps=2)
    assert "error" not in out, out
    print(f"{case}: estimate {out['estimate'] / 2**20:.0f} MiB, measured {out['measured'] / 2**20:.0f} MiB")
    assert out["measured"] > 500 * 2**20  # at least the fp32 weights: the measurement saw the model
    assert 0.8 <= out["ratio"] <= 1.2, out
