"""``alignd demo``: a real DPO job on SmolLM2-135M-Instruct through the real API, queue and worker.

It starts the embedded service (``alignd serve``) as a child process, uploads the built-in
concise-vs-verbose preference set, trains, follows progress, prints the loss curve, downloads the
adapter and compares a few generations before and after. Everything runs offline.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.auth import create_key
from service.client import Client
from service.db.engine import make_engine, make_session_factory, migrate, session_scope
from service.settings import Settings
from workers.demo_data import HELD_OUT_PROMPTS, preference_rows

BAR = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api_key(settings: Settings) -> str:
    engine = make_engine(settings.database)
    migrate(engine)
    with session_scope(make_session_factory(engine)) as session:
        return create_key(session, "demo")[1]


def _progress_line(job: dict[str, Any], loss: float | None, margin: float | None) -> str:
    progress: dict[str, Any] = job["progress"] or {}
    step, total = int(progress.get("step") or 0), int(progress.get("total_steps") or 0)
    filled = int(BAR * step / total) if total else 0
    extra = f" loss={loss:.4f}" if loss is not None else ""
    extra += f" margin={margin:.3f}" if margin is not None else ""
    return f"\r[{'#' * filled}{'.' * (BAR - filled)}] {step}/{total or '?'} {job['status']}{extra}   "


def _sparkline(values: list[float]) -> str:
    blocks = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(blocks[int((v - lo) / span * (len(blocks) - 1))] for v in values)


def _generate(model_dir: Path, adapter_dir: Path | None, prompts: list[str]) -> list[str]:
    import torch
    from peft import PeftModel

    from workers.base_models import load_tokenizer
    from workers.modeling import load_causal_lm

    tokenizer: Any = load_tokenizer(model_dir)
    model: Any = load_causal_lm(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    outputs: list[str] = []
    for prompt in prompts:
        ids: Any = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append(str(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)).strip())
    return outputs


def run(args: argparse.Namespace) -> int:
    started = time.time()
    settings = Settings.from_env()
    print(f"alignd demo — data dir {settings.data_dir}")
    key = _api_key(settings)
    port = _free_port()
    env = {**os.environ, "ALIGND_DATA_DIR": str(settings.data_dir)}
    alignd = Path(sys.executable).parent / "alignd"
    log_path = settings.data_dir / "demo-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    server = subprocess.Popen([str(alignd), "serve", "--port", str(port)], env=env, start_new_session=True,
                              stdout=log, stderr=subprocess.STDOUT)
    print(f"service on http://127.0.0.1:{port} (API + worker; log: {log_path})")
    try:
        client = Client(f"http://127.0.0.1:{port}", key)
        for _ in range(300):
            try:
                if client.http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        rows = preference_rows()
        training = client.upload_rows(rows, "concise_vs_verbose.jsonl")
        print(f"uploaded {training['id']}: {training['examples']} {training['format']} pairs "
              f"({training['status']})")
        job = client.create_job({
            "model": "SmolLM2-135M-Instruct", "training_file": training["id"], "suffix": "concise", "seed": 0,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {
                "n_epochs": args.epochs, "batch_size": 4, "learning_rate": 5e-4, "beta": 0.1, "max_length": 256,
                "checkpoint_every_steps": 10}}},
            "training_type": {"type": "lora", "r": 16, "alpha": 32,
                              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        })
        print(f"created {job['id']} (status {job['status']}); the worker converts SmolLM2 once on first use")
        loss = margin = None
        tty = sys.stdout.isatty()
        shown = ""
        for job, events in client.follow(job["id"], poll=1.0):  # noqa: B020 - job is refreshed on purpose
            for event in events:
                data = event.get("data") or {}
                if event["type"] == "metrics" and "loss" in data:
                    loss, margin = data["loss"], data.get("rewards/margins")
                elif event["type"] == "message":
                    sys.stdout.write(("\n" if tty and shown else "") + f"  · {event['message']}\n")
                    shown = ""
            line = _progress_line(job, loss, margin)
            if line != shown:  # redraw in a terminal, one line per change in a log
                sys.stdout.write(line if tty else line.lstrip("\r") + "\n")
                sys.stdout.flush()
                shown = line
        print()
        if job["status"] != "succeeded":
            print(f"job ended {job['status']}: {job['error']}")
            return 1
        losses = [p["value"] for p in client.metrics(job["id"], "loss")]
        margins = [p["value"] for p in client.metrics(job["id"], "rewards/margins")]
        accuracies = [p["value"] for p in client.metrics(job["id"], "rewards/accuracies")]
        tps = [p["value"] for p in client.metrics(job["id"], "tokens_per_second")]
        events = client.events(job["id"], limit=1000)
        times = [e["created_at"] for e in events if e["type"] == "metrics"]
        steps = len(losses)
        span = max(times[-1] - times[0], 1) if len(times) > 1 else 1
        print(f"loss curve  {_sparkline(losses)}  {losses[0]:.4f} → {losses[-1]:.4f} over {steps} steps")
        print(f"margin      {_sparkline(margins)}  {margins[0]:.3f} → {margins[-1]:.3f}")
        print(f"accuracy    {accuracies[-1]:.2f} at the last step")
        print(f"speed       {(steps - 1) / span:.2f} steps/s, {sum(tps) / len(tps):.0f} tokens/s (CPU)")
        adapter_dir = settings.data_dir / "demo-adapter" / job["id"]
        client.download_adapter(job["id"], adapter_dir)
        print(f"adapter     {adapter_dir} ({', '.join(sorted(p.name for p in adapter_dir.iterdir()))})")
        print(f"model       {job['fine_tuned_model']}")
        base_dir = settings.model_cache_dir / "SmolLM2-135M-Instruct"
        before = _generate(base_dir, None, HELD_OUT_PROMPTS)
        after = _generate(base_dir, adapter_dir, HELD_OUT_PROMPTS)
        print("\nheld-out prompts, before → after DPO:")
        for prompt, b, a in zip(HELD_OUT_PROMPTS, before, after, strict=True):
            print(f"\n  Q: {prompt}\n  before ({len(b.split())} words): {b}\n  after  ({len(a.split())} words): {a}")
        mean_before = sum(len(b.split()) for b in before) / len(before)
        mean_after = sum(len(a.split()) for a in after) / len(after)
        print(f"\nmean answer length {mean_before:.1f} → {mean_after:.1f} words")
        print(f"demo finished in {time.time() - started:.0f} s")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignd demo")
    parser.add_argument("--epochs", type=int, default=2)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
