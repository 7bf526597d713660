"""Why did a plain DPO loop shorten SmolLM2's answers (0.59x) when alignd, same settings, did not (1.03x)?

The issue's settings: LoRA r 16 / alpha 32 on q/k/v/o, lr 5e-4, beta 0.1, batch 8, 2 epochs, the
concise-vs-verbose pairs of ``bench/data.py`` (64 training, 32 held-out), max_length 128. Its plain
loop used a constant LR and no warmup. This script changes one thing at a time, each arm printing
``len`` = mean greedy answer length (words, 64 new tokens) on the 32 held-out prompts over the base's,
and ``acc`` = held-out implicit-reward accuracy:

alignd arms (the recipe in process, ``bench/dpo_defaults_sweep.train_point``, constant LR unless said):
  ``alignd``            the issue's settings;
  ``alignd-linear``     linear decay (the service's default schedule);
  ``alignd-noclip``     no gradient clipping (max_grad_norm 1e9; alignd clips at 1.0);
  ``alignd-dropout``    LoRA dropout 0.05 (alignd's default is 0, peft's LoraConfig too);
  ``alignd-seed1``      another seed (data order, LoRA A init).

plain arms (the ~60-line loop below: chosen and rejected as right-padded rows, sum of the masked
token log-probs, no accumulation, AdamW, constant LR, no clipping unless said; same tokens as alignd):
  ``plain``             completion tokens + the end-of-turn token (alignd's mask);
  ``plain-clip``        plus clipping at 1.0;
  ``plain-linear``      linear decay;
  ``plain-padding``     padding positions inside the mask (a right-padded batch without its mask):
                        the shorter side — the concise chosen — gets extra "free" tokens;
  ``plain-noeos``       the end-of-turn token left out of the log-ratio (the model is never told
                        where the chosen answer stops);
  ``plain-mean``        per-token mean instead of the sum (length-normalised, as SimPO/IPO variants);
  ``plain-prompt``      prompt tokens inside the mask. Chosen and rejected share the prompt, so its
                        term cancels exactly in ``(chosen - rejected)``: expected to change nothing.

Micro-batch weighting cannot differ here: batch 8 in one micro-batch on both sides (alignd weights
micro-batches by their share of pairs only under gradient accumulation).

Run (each arm is one 16-step training, minutes on 2 cores; hold the shared lock):
``flock /tmp/cpu.lock .venv/bin/python bench/dpo_length_cause.py --arms plain plain-padding``.
One ``arm=<name> acc=.. len=.. seconds=..`` line per arm; the last line is ``dpo_length_cause arms=<n>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ISSUE = {"learning_rate": 5e-4, "beta": 0.1, "n_epochs": 2, "lr_scheduler": "constant", "warmup_ratio": 0.0}
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
ALIGND_ARMS: dict[str, dict[str, Any]] = {
    "alignd": {},
    "alignd-linear": {"lr_scheduler": "linear"},
    "alignd-noclip": {"max_grad_norm": 1e9},
    "alignd-dropout": {"training": {**LORA, "dropout": 0.05}},
    "alignd-seed1": {"seed": 1},
}
PLAIN_ARMS: dict[str, dict[str, Any]] = {
    "plain": {}, "plain-clip": {"clip": 1.0}, "plain-linear": {"linear": True}, "plain-padding": {"mask": "padding"},
    "plain-noeos": {"mask": "noeos"}, "plain-mean": {"mean": True}, "plain-prompt": {"mask": "prompt"},
}


def plain_loop(*, train: int, val: int, seed: int = 0, clip: float | None = None, linear: bool = False,
               mask: str = "completion", mean: bool = False, model_name: str = "SmolLM2-135M-Instruct",
               ) -> dict[str, float]:
    """The issue's kind of loop, written from scratch (no alignd training code; alignd's tokenisation,
    so both sides train on the same tokens)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from bench.data import preference_pairs
    from service.settings import Settings
    from workers import data as D
    from workers.base_models import load_tokenizer, resolve_base_model
    from workers.modeling import eos_token_ids, load_causal_lm
    from workers.retention import greedy_answers

    torch.manual_seed(seed)
    path = resolve_base_model(model_name, Settings.from_env())
    tok = load_tokenizer(path)
    model = get_peft_model(load_causal_lm(path), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                            target_modules=LORA["target_modules"]))
    pairs = [D.tokenize_preference(D.normalize_preference(r), tok, 128) for r in preference_pairs(train, "train")]
    pad = tok.pad_token_id

    def rows(seqs: list[Any]) -> tuple[Any, Any]:
        width = max(len(s.input_ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        keep = torch.zeros((len(seqs), width))
        for i, s in enumerate(seqs):
            n = len(s.input_ids)
            ids[i, :n] = torch.tensor(s.input_ids)
            m = torch.tensor(s.loss_mask, dtype=torch.float)
            if mask == "prompt":
                m = torch.ones(n)
            elif mask == "noeos":
                m[int(m.nonzero().max())] = 0.0
            keep[i, :n] = m
            if mask == "padding":
                keep[i, n:] = 1.0
        return ids, keep

    def logps(module: Any, ids: Any, keep: Any) -> Any:
        logits = module(input_ids=ids).logits[:, :-1].float()
        token = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(2)
        weights = keep[:, 1:]
        total = (token * weights).sum(1)
        return total / weights.sum(1).clamp(min=1) if mean else total

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=ISSUE["learning_rate"], weight_decay=0.0)
    steps = 2 * ((len(pairs) + 7) // 8)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1 - s / steps if linear else 1.0)
    began = time.perf_counter()
    model.train()
    for epoch in range(2):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order), 8):
            batch = [pairs[i] for i in order[start:start + 8]]
            ids, keep = rows([p.chosen for p in batch] + [p.rejected for p in batch])
            with torch.no_grad(), model.disable_adapter():
                ref = logps(model, ids, keep)
            pol = logps(model, ids, keep)
            n = len(batch)
            margin = 0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
            loss = -F.logsigmoid(margin).mean()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optim.step()
            sched.step()
            optim.zero_grad()
    model.eval()
    validation = preference_pairs(val, "validation")
    held = [D.tokenize_preference(D.normalize_preference(r), tok, 128) for r in validation]
    with torch.no_grad():
        ids, keep = rows([p.chosen for p in held] + [p.rejected for p in held])  # the arm's own mask
        pol = logps(model, ids, keep)
        with model.disable_adapter():
            ref = logps(model, ids, keep)
    n = len(held)
    acc = float((((pol[:n] - ref[:n]) - (pol[n:] - ref[n:])) > 0).float().mean())
    prompts = [D.prompt_ids(D.normalize_prompt({"prompt": r["prompt"]}), tok, 512) for r in validation]
    eos = eos_token_ids(model.get_base_model(), tok)

    def words(base: bool) -> float:
        if base:
            with model.disable_adapter():
                texts = greedy_answers(model, tok, prompts, max_new_tokens=64, eos_ids=eos,
                                       device=torch.device("cpu"))
        else:
            texts = greedy_answers(model, tok, prompts, max_new_tokens=64, eos_ids=eos, device=torch.device("cpu"))
        return sum(len(t.split()) for t in texts) / len(texts)

    ratio = words(False) / max(words(True), 1e-9)
    return {"acc": acc, "len": ratio, "seconds": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", nargs="+", default=["plain", "alignd"], choices=[*ALIGND_ARMS, *PLAIN_ARMS])
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=32)
    args = parser.parse_args()
    import torch

    from bench.dpo_defaults_sweep import train_point

    torch.set_num_threads(2)
    for arm in args.arms:
        if arm in PLAIN_ARMS:
            out = plain_loop(train=args.train, val=args.val, **PLAIN_ARMS[arm])
        else:
            options = dict(ALIGND_ARMS[arm])
            seed = options.pop("seed", 0)
            training = options.pop("training", LORA)
            with tempfile.TemporaryDirectory() as tmp:
                out = train_point(Path(tmp), train=args.train, val=args.val, seed=seed, training=training,
                                  **{**ISSUE, **options})
        print(f"arm={arm} acc={out['acc']:.2f} len={out['len']:.2f} seconds={out['seconds']:.0f}", flush=True)
    print(f"dpo_length_cause arms={len(args.arms)}")


if __name__ == "__main__":
    main()
