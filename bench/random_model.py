"""Write a random-init model directory from a real architecture, for the side-by-sides on a GPU.

Model files cannot travel to the GPU machine (a 64 MiB limit) and speed does not depend on the weights,
so ``bench/dpo_vs_trl.py --device cuda`` and ``bench/grpo_vs_trl.py --device cuda`` train a model built
here: the architecture of ``bench/gpu.py``'s ``--models`` names (``llama3-8b``, ``qwen2.5-7b``,
``smollm2-135m``, ``tiny``), random bf16 weights from a fixed seed, and SmolLM2's tokenizer (its ids
all lie inside these vocabularies; carry ``.alignd/models/SmolLM2-135M-Instruct`` minus its weights).
Both sides then load the same directory, named through ``ALIGND_MODELS=<name>=<dir>``.

Run: ``python bench/random_model.py --model llama3-8b --tokenizer DIR --out DIR``; prints the
``ALIGND_MODELS`` entry.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def write_random_model(model: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bench.gpu import model_config

    values = model_config(model)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
    if vocab > config.vocab_size:
        raise SystemExit(f"the tokenizer's {vocab} ids do not fit {model}'s vocabulary of {config.vocab_size}")
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        built = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    built.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a directory holding tokenizer.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = write_random_model(args.model, args.tokenizer, args.out)
    print(f"ALIGND_MODELS={args.model}-random={out}")


if __name__ == "__main__":
    main()
