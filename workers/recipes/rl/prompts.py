"""Prompt files for online RL: lines as :class:`~workers.recipes.rl.engine.Prompt` s, and their batches.

A line is ``{"messages": [...]}`` ending in a user turn (OpenAI's RFT lines add any extra fields, which
graders read as ``{{item.<field>}}``: the whole line is kept as the prompt's ``item``) or
``{"prompt": "..."}``. Prompts are rendered with the chat template plus the assistant header
(``workers.data.prompt_ids``) and keep their last ``max_length - max_new_tokens`` tokens.
"""

from __future__ import annotations

import random
from typing import Any

from workers import data as D
from workers.context import JobContext, JobFailure
from workers.recipes.rl.engine import Prompt


def load_prompts(ctx: JobContext, rows: list[dict[str, Any]], param: str, tokenizer: Any, budget: int) -> list[Prompt]:
    """A prompts file as :class:`Prompt` s, left-truncated to ``budget`` tokens (counted and reported)."""
    out, truncated = [], 0
    for row in rows:
        messages = D.normalize_prompt(row)
        ids = D.prompt_ids(messages, tokenizer, budget + 1)
        truncated += int(len(ids) > budget)
        out.append(Prompt(messages, ids[-budget:], row))
    if not out:
        code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
        raise JobFailure(code, f"{param} holds no prompts", param)
    if truncated:
        ctx.reporter.event(f"{truncated} of {len(rows)} prompts in {param} were cut to their last {budget} "
                           "tokens (max_length - max_new_tokens)", level="warn",
                           data={"truncated": truncated, "file": param})
    return out


def prompt_batches(n_prompts: int, batch_size: int, n_epochs: int, seed: int) -> list[list[list[int]]]:
    """Index batches of prompts per epoch, shuffled afresh every epoch from the job's seed."""
    epochs = []
    for epoch in range(n_epochs):
        order = list(range(n_prompts))
        random.Random(seed + epoch).shuffle(order)
        epochs.append([order[i:i + batch_size] for i in range(0, n_prompts, batch_size)])
    return epochs
