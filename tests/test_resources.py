"""Resource planning: memory arithmetic against hand-computed numbers, routing to queues, refusal of a
job nobody can hold, and ``dry_run`` (an estimate, no job)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from service.db.engine import session_scope
from service.db.models import Job, MetricPoint
from service.resources import (
    CONFIG_DIR,
    GiB,
    InsufficientResources,
    JobShape,
    ModelShape,
    estimate_memory,
    load_model_config,
    place,
)
from service.settings import PlacementSettings, Settings, parse_bytes, parse_queues
from tests.conftest import PREFERENCE_ROWS, Api, _api, jsonl, make_settings

LLAMA2_7B = ModelShape.from_config(json.loads((CONFIG_DIR / "llama-2-7b.json").read_text()))
SMOLLM2 = ModelShape.from_config(json.loads((CONFIG_DIR / "SmolLM2-135M-Instruct.json").read_text()))
OVERHEAD = 1 << 30

# Llama-2-7B by hand: h=4096, 32 layers, 32 heads of 128, 32 kv heads, i=11008, vocab 32000, untied.
#   per layer: attention 4·4096² = 67,108,864; MLP 3·4096·11008 = 135,266,304; 2 norms 8,192
#   = 202,383,360 × 32 = 6,476,267,520; embeddings + head 2·32000·4096 = 262,144,000; final norm 4,096
P7B = 6_738_415_616
# LoRA r=16 on q,k,v,o: 4 · 16·(4096+4096) = 524,288 per layer × 32
LORA7B = 16_777_216
# activations per token and layer, bf16: attention 2·(5·4096 + 2·4096) = 57,344;
# gated MLP 2·(2·4096 + 4·11008) = 104,448
ACT7B = 161_792


def test_parameter_counts_match_the_published_sizes() -> None:
    assert LLAMA2_7B.parameters() == P7B
    assert LLAMA2_7B.lora_parameters(16, ["q_proj", "k_proj", "v_proj", "o_proj"]) == LORA7B
    assert LLAMA2_7B.activation_bytes_per_token_layer() == ACT7B
    llama3 = ModelShape.from_config(json.loads((CONFIG_DIR / "llama-3-8b.json").read_text()))
    assert llama3.parameters() == 8_030_261_248  # GQA: 8 kv heads; vocab 128256
    # SmolLM2-135M: embeddings 49152·576 = 28,311,552 (tied); per layer q 576² + k,v 2·576·192 + o 576²
    # = 884,736, MLP 3·576·1536 = 2,654,208, norms 1,152 → 3,540,096 × 30; final norm 576
    assert SMOLLM2.parameters() == 28_311_552 + 30 * 3_540_096 + 576 == 134_515_008
    assert SMOLLM2.lora_parameters(16, ["q_proj", "k_proj", "v_proj", "o_proj"]) == 30 * 61_440


def test_lora_dpo_7b_is_one_bf16_copy_plus_fp32_adapter_state() -> None:
    e = estimate_memory(LLAMA2_7B, JobShape("dpo", lora=True, batch_size=1, max_length=512))
    tokens = 2 * 1 * 512  # chosen + rejected of one pair
    assert e.model_copies == 1
    assert e.components == {
        "weights": P7B * 2,  # 13,476,831,232: the reference is the adapter-disabled base
        "trainable_state": LORA7B * 16,  # fp32 weight + grad + Adam m, v
        "activations": tokens * 32 * ACT7B,  # 5,301,600,256
        "logits": 512 * 32000 * 10,  # completion half of the tokens
        "overhead": OVERHEAD,
    }
    assert e.bytes == 20_284_448_768  # 18.9 GiB


def test_full_dpo_7b_is_two_copies_plus_bf16_adam() -> None:
    e = estimate_memory(LLAMA2_7B, JobShape("dpo", lora=False, batch_size=1, max_length=512))
    assert e.model_copies == 2 and e.trainable_parameters == P7B
    assert e.components["weights"] == 2 * P7B * 2
    assert e.components["trainable_state"] == P7B * 6  # bf16 grad 2 + AdamW m, v in bf16 4
    assert e.bytes == 73_923_338_240  # 68.8 GiB


def test_ppo_7b_roles() -> None:
    job = dict(max_length=512, mini_batch_size=1, rollout_batch_size=4)
    full = estimate_memory(LLAMA2_7B, JobShape("ppo", lora=False, **job))  # type: ignore[arg-type]
    # policy, reference, value, reward model: four copies; policy and value trained (+ value head)
    assert full.model_copies == 4
    assert full.components["weights"] == 4 * P7B * 2
    assert full.components["trainable_state"] == 2 * P7B * 6 + 4096 * 16
    assert full.components["activations"] == 2 * 512 * 32 * ACT7B  # policy and value backward
    assert full.components["kv_cache"] == 4 * 512 * (32 * 2 * 32 * 128 * 2)
    assert full.bytes == 142_299_381_760  # 132.5 GiB
    lora = estimate_memory(LLAMA2_7B, JobShape("ppo", lora=True, **job))  # type: ignore[arg-type]
    # policy, value (adapters) and reference (adapters off) share the base; a separate reward model
    assert lora.model_copies == 2
    assert lora.components["weights"] == 2 * P7B * 2
    assert lora.components["trainable_state"] == 2 * LORA7B * 16 + 4096 * 16
    assert lora.bytes == 48_498_434_048 - P7B * 2  # the seed's three copies, less the value model's
    # a LoRA reward model of the same base is a third adapter: one copy of the base for all four roles
    shared = estimate_memory(LLAMA2_7B, JobShape("ppo", lora=True, reward_adapter=True, **job))  # type: ignore[arg-type]
    assert shared.model_copies == 1 and shared.components["weights"] == P7B * 2
    # a reward model on a smaller base is sized from its own config
    small_rm = estimate_memory(LLAMA2_7B, JobShape("ppo", lora=True, **job), reward_model=SMOLLM2)  # type: ignore[arg-type]
    assert small_rm.components["weights"] == P7B * 2 + 134_515_008 * 2


def test_smollm2_estimates() -> None:
    e = estimate_memory(SMOLLM2, JobShape("dpo", lora=True, batch_size=8, max_length=1024))
    # 16 sequences × 1024 tokens × 30 layers × (2·(5·576 + 2·192) + 2·(2·576 + 4·1536) = 21,120 B)
    assert e.components["activations"] == 16 * 1024 * 30 * 21_120
    assert e.components["weights"] == 134_515_008 * 2
    assert e.components["logits"] == 8 * 1024 * 49152 * 10
    ckpt = estimate_memory(
        SMOLLM2, JobShape("dpo", lora=False, batch_size=2, max_length=256, gradient_checkpointing=True)
    )
    # checkpointing keeps each layer's input (2·576 B a token) plus one layer in full
    assert ckpt.components["activations"] == 4 * 256 * (30 * 2 * 576 + 21_120)
    assert ckpt.bytes == 2_727_566_464
    rm = estimate_memory(SMOLLM2, JobShape("reward_model", lora=True, batch_size=8, max_length=1024))
    assert rm.components["logits"] == 0  # one score per sequence, no vocabulary


QUEUES = parse_queues("gpu-24g=24GiB,gpu-80g=80GiB:4,cpu=8GiB")


def test_routing_picks_the_smallest_queue_that_holds_the_job() -> None:
    assert QUEUES[0].capacity_bytes == 24 * GiB and QUEUES[1].devices == 4 and QUEUES[2].devices == 1
    small = place(QUEUES, SMOLLM2, JobShape("dpo", lora=True, batch_size=2, max_length=256))
    assert small.queue.name == "cpu"
    lora7b = place(QUEUES, LLAMA2_7B, JobShape("dpo", lora=True, batch_size=1, max_length=512))
    assert lora7b.queue.name == "gpu-24g"
    full7b = place(QUEUES, LLAMA2_7B, JobShape("dpo", lora=False, batch_size=1, max_length=512))
    assert full7b.queue.name == "gpu-80g" and full7b.estimate and full7b.estimate.strategy == "single"
    # unknown shape: the largest queue
    assert place(QUEUES, None, JobShape("dpo", lora=True)).queue.name == "gpu-80g"


def test_multi_gpu_full_fine_tune_falls_back_to_fsdp() -> None:
    ppo = JobShape("ppo", lora=False, max_length=512, mini_batch_size=4, rollout_batch_size=16)
    placed = place(QUEUES, LLAMA2_7B, ppo, devices=4)
    assert placed.queue.name == "gpu-80g" and placed.estimate is not None
    assert placed.estimate.strategy == "fsdp" and placed.estimate.bytes < 80 * GiB
    assert placed.estimate.components["weights"] == 4 * P7B * 2 // 4
    with pytest.raises(InsufficientResources, match="asks for 8 GPUs; the largest worker has 4"):
        place(QUEUES, LLAMA2_7B, ppo, devices=8)


def test_an_oversized_job_is_refused_with_what_it_needs() -> None:
    with pytest.raises(InsufficientResources) as info:
        place(QUEUES, LLAMA2_7B, JobShape("ppo", lora=False))
    assert "needs about 174.6 GiB per device" in info.value.message
    assert "the largest queue, 'gpu-80g', has 80.0 GiB per device" in info.value.message


def test_sizes_and_queues_parse() -> None:
    assert (
        parse_bytes("24GiB") == 24 << 30
        and parse_bytes("80GB") == 80 * 10**9
        and parse_bytes("24Gi") == 24 << 30
    )
    assert parse_bytes("unlimited") is None
    assert parse_queues("a=1GiB:*,b=unlimited")[0].devices is None
    for bad in ("a", "a=lots", "a=1GiB,a=2GiB", "bad name=1GiB"):
        with pytest.raises(ValueError):
            parse_queues(bad)


# ------------------------------------------------------------------------------------------- the API


@pytest.fixture
def planned_api(tmp_path: Path) -> Iterator[tuple[Api, Settings]]:
    """Queues like a production site's, and a 7B model known only by its config.json."""
    model_dir = tmp_path / "llama-2-7b"
    model_dir.mkdir()
    shutil.copy(CONFIG_DIR / "llama-2-7b.json", model_dir / "config.json")
    settings = replace(
        make_settings(tmp_path / "data"),
        models={"llama-2-7b": str(model_dir)},
        placement=PlacementSettings(queues=QUEUES, worker_queue="gpu-24g", tokens_per_second=500.0),
    )
    gen = _api(settings)
    api = next(gen)
    try:
        yield api, settings
    finally:
        next(gen, None)


def _upload(api: Api, headers: dict[str, str]) -> str:
    r = api.client.post(
        "/v1/files",
        headers=headers,
        files={"file": ("t.jsonl", jsonl(PREFERENCE_ROWS))},
        data={"purpose": "fine-tune"},
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def test_a_job_nobody_can_hold_is_refused_and_nothing_is_created(planned_api: tuple[Api, Settings]) -> None:
    api, settings = planned_api
    headers = api.key("acme")
    file_id = _upload(api, headers)
    body = {
        "model": "llama-2-7b",
        "training_file": file_id,
        "training_type": {"type": "full"},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 1024, "max_length": 4096}}},
    }
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_resources" and error["param"] == "resources"
    assert "GiB per device" in error["message"] and "'gpu-80g', has 80.0 GiB" in error["message"]
    assert api.client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"] == []
    # more GPUs than any worker has
    r = api.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={**body, "training_type": {"type": "lora"}, "resources": {"gpus": 8}},
    )
    assert r.status_code == 400 and "largest worker has 4" in r.json()["error"]["message"]


def test_a_job_that_fits_carries_its_estimate_and_queue(planned_api: tuple[Api, Settings]) -> None:
    api, _ = planned_api
    headers = api.key("acme")
    file_id = _upload(api, headers)
    r = api.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={
            "model": "llama-2-7b",
            "training_file": file_id,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 1, "max_length": 512}}},
        },
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["resources"] == {"gpus": 1, "strategy": "single", "queue": "gpu-24g"}
    # the file's examples are short: the estimate uses their length, not max_length
    assert 13 * GiB < job["estimated_memory_bytes"] < 20 * GiB
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?order=asc", headers=headers).json()[
        "data"
    ]
    assert any("routed to queue 'gpu-24g'" in e["message"] for e in events)


def test_dry_run_returns_the_estimate_and_creates_no_job(planned_api: tuple[Api, Settings]) -> None:
    api, _ = planned_api
    headers = api.key("acme")
    file_id = _upload(api, headers)
    body = {
        "model": "llama-2-7b",
        "training_file": file_id,
        "dry_run": True,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 4, "n_epochs": 2}}},
    }
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.status_code == 200, r.text
    estimate = r.json()
    assert estimate["object"] == "fine_tuning.job.estimate"
    assert estimate["total_steps"] == 8  # 16 pairs / 4 per step × 2 epochs
    assert estimate["examples"] == 16 and estimate["tokens_per_epoch"] > 16 * 10
    assert estimate["total_tokens"] == 2 * estimate["tokens_per_epoch"]
    assert estimate["tokens_per_second"] == 500.0 and "configured" in estimate["tokens_per_second_source"]
    assert estimate["estimated_duration_seconds"] == pytest.approx(estimate["total_tokens"] / 500.0, abs=0.1)
    assert estimate["queue"] == "gpu-24g" and estimate["memory"]["parameters"] == P7B
    assert estimate["estimated_memory_bytes"] == estimate["memory"]["bytes"]
    assert api.client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"] == []


def test_dry_run_time_comes_from_measured_throughput(planned_api: tuple[Api, Settings]) -> None:
    api, _ = planned_api
    headers = api.key("acme")
    file_id = _upload(api, headers)
    body = {
        "model": "llama-2-7b",
        "training_file": file_id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 1, "max_length": 512}}},
    }
    done = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()
    with session_scope(api.state.sessions) as session:  # as if a worker had run it
        job = session.get(Job, done["id"])
        assert job is not None
        job.status, job.finished_at = "succeeded", job.created_at + 60
        session.add_all(
            MetricPoint(job_id=job.id, step=s, name="tokens_per_second", value=v)
            for s, v in ((1, 1000.0), (2, 3000.0))
        )
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**body, "dry_run": True})
    estimate = r.json()
    assert estimate["tokens_per_second"] == 2000.0 and estimate["tokens_per_second_source"].startswith(
        "measured"
    )


def test_builtin_configs_ship_without_torch(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    config = load_model_config("SmolLM2-135M-Instruct", settings)
    assert config is not None and config["hidden_size"] == 576 and config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True and config["intermediate_size"] == 1536
    assert load_model_config("no-such-model", settings) is None


# ------------------------------------------------------------------------------------- several nodes

MN_QUEUES = parse_queues("gpu-24g=24GiB,gpu-80g=80GiB:4,gpu-80g-multinode=80GiB:8:multinode=4")
LAYER7B = 202_383_360  # parameters of one Llama-2-7B decoder layer (see the top of this file)


def test_multinode_queues_parse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mn = MN_QUEUES[2]
    assert (mn.name, mn.capacity_bytes, mn.devices, mn.multinode, mn.max_nodes) == (
        "gpu-80g-multinode", 80 * GiB, 8, True, 4)
    assert not MN_QUEUES[0].multinode and not MN_QUEUES[1].multinode
    open_ended = parse_queues("mn=40GiB:multinode")[0]
    assert (open_ended.devices, open_ended.multinode, open_ended.max_nodes) == (1, True, None)
    assert parse_queues("mn=40GiB:*:multinode=2")[0].devices is None
    for bad in ("a=1GiB:8:multinode=0", "a=1GiB:8:multinode=x", "a=1GiB:8:fast"):
        with pytest.raises(ValueError):
            parse_queues(bad)
    # the embedded default's single queue takes multi-node jobs (its worker runs them on this machine)
    monkeypatch.delenv("ALIGND_QUEUES", raising=False)
    (default,) = Settings.from_env(tmp_path).placement.queues
    assert default.multinode and default.devices is None and default.max_nodes is None


def test_multinode_full_fine_tune_shards_weights_and_adam_over_every_rank() -> None:
    """2 nodes × 8 GPUs: FSDP2 over 16 ranks, so the two fp32 copies (policy and the sharded frozen
    reference) and the fp32 gradients and AdamW moments are a sixteenth each; a pair per rank
    (batch 16 over 16 ranks); two bf16 layers and the bf16 embedding (or head) gathered at a time."""
    job = JobShape("dpo", lora=False, batch_size=16, max_length=512)
    placed = place(MN_QUEUES, LLAMA2_7B, job, devices=8, nodes=2)
    e = placed.estimate
    assert placed.queue.name == "gpu-80g-multinode" and e is not None
    assert (e.strategy, e.devices, e.nodes) == ("fsdp", 16, 2)
    assert e.components == {
        "weights": 3_369_207_808,          # 2 copies × 6,738,415,616 × 4 B (fp32 masters) / 16
        "trainable_state": 5_053_811_712,  # (4 B fp32 gradient + 8 B fp32 AdamW m, v) × 6,738,415,616 / 16
        "activations": 5_301_600_256,      # 1 pair = 2 × 512 tokens × 32 layers × 161,792 B
        "logits": 163_840_000,             # 512 completion tokens × 32000 × 10 B
        "overhead": OVERHEAD,
        # one layer computing, the next prefetched, one 32000 × 4096 embedding or head: bf16
        "fsdp_gather": (2 * LAYER7B + 131_072_000) * 2,
        "fsdp_reduce": LAYER7B * 6,        # a layer's bf16 gradients and their fp32 copy to reduce-scatter
    }
    assert e.bytes == 17_248_179_200
    one_node = estimate_memory(LLAMA2_7B, job, devices=8, strategy="fsdp")
    assert one_node.components["weights"] == 2 * e.components["weights"]  # 8 ranks share, not 16


def test_multinode_lora_replicates_the_base_on_every_rank() -> None:
    job = JobShape("dpo", lora=True, batch_size=16, max_length=512)
    e = place(MN_QUEUES, LLAMA2_7B, job, devices=4, nodes=2).estimate
    assert e is not None and (e.strategy, e.devices) == ("ddp", 8)
    assert e.components["weights"] == 13_476_831_232          # the whole bf16 base on each rank
    assert e.components["trainable_state"] == LORA7B * 16
    assert e.components["activations"] == 10_603_200_512       # ceil(16 / 8) = 2 pairs → 2048 tokens


def test_multinode_routing_and_refusals() -> None:
    small = JobShape("dpo", lora=True, batch_size=2, max_length=256)
    assert place(MN_QUEUES, SMOLLM2, small).queue.name == "gpu-24g"  # one node: a plain queue
    assert place(MN_QUEUES, SMOLLM2, small, devices=8).queue.name == "gpu-80g-multinode"  # 8 GPUs: only there
    tie = parse_queues("plain=80GiB:8,mn=80GiB:8:multinode")
    assert place(tie, SMOLLM2, small, devices=8).queue.name == "plain"
    assert place(tie, SMOLLM2, small, devices=8, nodes=3).queue.name == "mn"
    with pytest.raises(InsufficientResources, match="no queue here launches multi-node jobs"):
        place(QUEUES, SMOLLM2, small, devices=1, nodes=2)
    with pytest.raises(InsufficientResources, match="asks for 8 nodes; multi-node queues take at most 4"):
        place(MN_QUEUES, SMOLLM2, small, devices=8, nodes=8)
    with pytest.raises(InsufficientResources, match="16 GPUs per node; the multi-node queues' nodes have at most 8"):
        place(MN_QUEUES, SMOLLM2, small, devices=16, nodes=2)
    with pytest.raises(InsufficientResources, match=r"2 nodes × 8 GPUs = 16 ranks.*or more nodes"):
        place(MN_QUEUES, LLAMA2_7B, JobShape("ppo", lora=False, max_length=4096, mini_batch_size=64),
              devices=8, nodes=2)


@pytest.mark.parametrize(("resources", "layout"), [
    ({"nodes": 2, "gpus_per_node": 4}, (2, 4)),
    ({"nodes": 2, "gpus": 8}, (2, 4)),
    ({"gpus_per_node": 4}, (1, 4)),
    ({"nodes": 3}, (3, 1)),
    ({"gpus": 4}, (1, 4)),
    ({"nodes": 2, "gpus_per_node": 4, "gpus": 8}, (2, 4)),
    ({}, (1, 1)),
])
def test_multinode_resources_layout(resources: dict[str, int], layout: tuple[int, int]) -> None:
    import msgspec

    from service.jobs.spec import Resources

    assert msgspec.convert(resources, Resources).layout() == layout


@pytest.fixture
def multinode_api(tmp_path: Path) -> Iterator[Api]:
    model_dir = tmp_path / "llama-2-7b"
    model_dir.mkdir()
    shutil.copy(CONFIG_DIR / "llama-2-7b.json", model_dir / "config.json")
    settings = replace(make_settings(tmp_path / "data"), models={"llama-2-7b": str(model_dir)},
                       placement=PlacementSettings(queues=MN_QUEUES, worker_queue="gpu-24g"))
    gen = _api(settings)
    api = next(gen)
    try:
        yield api
    finally:
        next(gen, None)


def test_multinode_job_is_routed_estimated_and_shown(multinode_api: Api) -> None:
    api = multinode_api
    headers = api.key("acme")
    body = {"model": "llama-2-7b", "training_file": _upload(api, headers), "training_type": {"type": "full"},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 16, "max_length": 512}}},
            "resources": {"nodes": 2, "gpus_per_node": 8}}
    estimate = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**body, "dry_run": True}).json()
    assert estimate["resources"] == {"gpus": 16, "nodes": 2, "gpus_per_node": 8, "strategy": "fsdp"}
    assert estimate["queue"] == "gpu-80g-multinode"
    assert estimate["memory"]["devices"] == 16 and estimate["memory"]["nodes"] == 2
    # a sixteenth of the two fp32 copies, as in the estimate by hand above
    assert estimate["memory"]["components"]["weights"] == 3_369_207_808
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["resources"] == {"gpus": 16, "nodes": 2, "gpus_per_node": 8, "strategy": "fsdp",
                                "queue": "gpu-80g-multinode"}
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=headers).json()["data"]
    assert any("(fsdp) on 2 nodes × 8 GPUs; routed to queue 'gpu-80g-multinode'" in e["message"] for e in events)


@pytest.mark.parametrize(("resources", "param", "text"), [
    ({"nodes": 2, "gpus_per_node": 4, "gpus": 6}, "resources.gpus", "must equal resources.nodes × resources"),
    ({"nodes": 2, "gpus": 3}, "resources.gpus", "not a multiple of resources.nodes"),
    ({"gpus": 65}, "resources.gpus", "more than one node holds"),
    ({"nodes": 0, "gpus_per_node": 1}, "resources.nodes", ">= 1"),
    ({"nodes": 2, "gpus_per_node": 0}, "resources.gpus_per_node", ">= 1"),
    ({"nodes": 2, "gpu_per_node": 2}, "resources.gpu_per_node", "unknown field"),
    ({"nodes": 16, "gpus_per_node": 8}, "resources", "asks for 16 nodes; multi-node queues take at most 4"),
])
def test_multinode_bad_resources_are_400s_naming_the_field(multinode_api: Api, resources: dict[str, int],
                                                             param: str, text: str) -> None:
    api = multinode_api
    headers = api.key("acme")
    body = {"model": "llama-2-7b", "training_file": _upload(api, headers), "resources": resources,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 1, "max_length": 512}}}}
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and text in error["message"], error
    assert api.client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"] == []
