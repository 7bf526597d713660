"""``resources.gpus`` > 1: the worker runs the recipe under ``accelerate launch`` and supervises it.

On this CPU-only machine the ranks use gloo: a 2-process DPO run must give the 1-process loss curve
for the same global batch, and cancel must take the whole process group down.
"""

from __future__ import annotations

import time
from dataclasses import replace

import psutil
import pytest

from service.settings import Settings
from tests.conftest import PREFERENCE_ROWS, LiveService, make_settings
from workers.distributed import combine_ranks, shard_batches
from workers.launch import launch_command, settings_env


def dpo_job(file_id: str, gpus: int, **hyper: object) -> dict[str, object]:
    hp = {"batch_size": 4, "max_steps": 4, "learning_rate": 1e-3, **hyper}
    return {"model": "tiny-random-llama", "training_file": file_id, "seed": 7, "resources": {"gpus": gpus},
            "method": {"type": "dpo", "dpo": {"hyperparameters": hp}}}


def test_two_gloo_processes_reproduce_the_one_process_loss_curve(live: LiveService) -> None:
    f = live.upload(PREFERENCE_ROWS)  # 16 pairs: 4 global batches of 4, 2 pairs per rank
    one = live.run(dpo_job(f["id"], 1), timeout=300)
    two = live.run(dpo_job(f["id"], 2), timeout=300)
    assert one["status"] == two["status"] == "succeeded", (one["error"], two["error"])
    assert two["resources"] == {"gpus": 2, "strategy": "ddp", "queue": "alignd"}
    curves = {name: (live.metric(one["id"], name), live.metric(two["id"], name))
              for name in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate")}
    print("\nstep  loss (1 process)  loss (2 processes)")
    for step, (a, b) in enumerate(zip(*curves["loss"], strict=True), start=1):
        print(f"{step:>4}  {a:.7f}         {b:.7f}")
    for name, (a, b) in curves.items():
        assert len(a) == len(b) == 4, name
        assert b == pytest.approx(a, abs=1e-5), name
    assert curves["loss"][0][-1] < curves["loss"][0][0]  # it learned
    # tokens are summed over the ranks: the same data was seen
    assert live.metric(two["id"], "num_tokens") == live.metric(one["id"], "num_tokens")
    assert two["trained_tokens"] == one["trained_tokens"]
    events = [e["message"] for e in live.get(f"/v1/fine_tuning/jobs/{two['id']}/events?order=asc&limit=100")
              .json()["data"]]
    assert "Launching 2 processes (DDP) with accelerate" in events
    assert sum(m.startswith("Step ") for m in events) == 4  # rank 0 only reports
    adapter = live.api.client.get(f"/v1/fine_tuning/jobs/{two['id']}/adapter", headers=live.headers)
    assert adapter.status_code == 200


def _group_processes(job_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if job_id in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_cancel_stops_every_rank(live: LiveService) -> None:
    f = live.upload(PREFERENCE_ROWS * 4)
    job = live.create_job(dpo_job(f["id"], 2, max_steps=None, n_epochs=50, batch_size=2))
    deadline = time.time() + 240
    while live.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 2:
        assert time.time() < deadline, live.log.read_text()[-4000:]
        time.sleep(0.3)
    assert len(_group_processes(job["id"])) >= 3  # the launcher and two ranks
    cancel = live.api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=live.headers)
    assert cancel.status_code == 200
    cancelled = time.time()
    while _group_processes(job["id"]) and time.time() - cancelled < 60:
        time.sleep(0.5)
    assert _group_processes(job["id"]) == [], "ranks still running after cancel"
    final = live.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["fine_tuned_model"] is None
    step = final["progress"]["step"]
    time.sleep(1)
    assert live.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] == step


def test_combining_rank_metrics() -> None:
    ranks = [{"loss": 0.5, "num_tokens": 10.0, "tokens_per_second": 100.0, "reward/min": -1.0,
              "reward/max": 2.0, "memory/host_peak_rss_bytes": 1e9,
              "memory/gpu_peak_allocated_bytes/cuda:0": 5.0},
             {"loss": 0.7, "num_tokens": 12.0, "tokens_per_second": 80.0, "reward/min": -3.0,
              "reward/max": 1.0, "memory/host_peak_rss_bytes": 2e9,
              "memory/gpu_peak_allocated_bytes/cuda:1": 7.0}]
    assert combine_ranks(ranks) == {
        "loss": pytest.approx(0.6), "num_tokens": 22.0, "tokens_per_second": 180.0, "reward/min": -3.0,
        "reward/max": 2.0, "memory/host_peak_rss_bytes": 3e9,
        "memory/gpu_peak_allocated_bytes/cuda:0": 5.0, "memory/gpu_peak_allocated_bytes/cuda:1": 7.0}


def test_each_rank_takes_its_slice_of_every_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [[0, 1, 2, 3], [4, 5, 6], [7]]
    assert shard_batches(batches) == batches
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert shard_batches(batches) == [[0, 2], [4, 6], [7]]
    monkeypatch.setenv("RANK", "1")
    assert shard_batches(batches) == [[1, 3], [5], [7]]  # a batch smaller than the world repeats an example


def test_ranks_rebuild_the_workers_settings(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = replace(make_settings(tmp_path / "data"), models={"m": "/models/m", "n": "s3://b/n"})  # type: ignore[operator]
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings.from_env()
    assert (rebuilt.database, rebuilt.storage, rebuilt.models, rebuilt.model_cache_dir, rebuilt.data_dir) == \
        (settings.database, settings.storage, settings.models, settings.model_cache_dir, settings.data_dir)
    ddp = launch_command("ftjob-x", 4, "ddp", 29500)
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in ddp
    assert ddp[-3:] == ["-m", "workers.launch", "ftjob-x"] and ddp[ddp.index("--num_processes") + 1] == "4"
    fsdp = launch_command("ftjob-x", 4, "fsdp", 29500)
    # FSDP2 is the recipe's (workers.fsdp, from the job's strategy), not accelerate's FSDP1 plugin
    assert fsdp == ddp and not any(arg.startswith("--fsdp") or arg == "--use_fsdp" for arg in fsdp)
