"""Cancel reaches a running job at its next step boundary (at most the step in flight is trained after
it), within seconds, and the worker is free for the next job."""

from __future__ import annotations

import time

from tests.conftest import PREFERENCE_ROWS, LiveService
from tests.processes import wait_for_job


def test_cancel_stops_a_running_job_quickly(live: LiveService) -> None:
    f = live.upload(PREFERENCE_ROWS * 8)
    job = live.create_job({"model": "tiny-random-llama", "training_file": f["id"],
                           "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 2, "n_epochs": 50}}}})
    # wait until it is really training
    deadline = time.time() + 120
    while time.time() < deadline and live.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 2:
        time.sleep(0.2)
    r = live.api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=live.headers)
    cancelled_at = time.time()
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    step_at_cancel = r.json()["progress"]["step"]  # read after the cancel was written
    assert step_at_cancel >= 2
    # the worker notices within a few seconds: its "stopped" event appears and steps stop advancing
    while time.time() - cancelled_at < 10:
        events = live.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=5").json()["data"]
        if any("Training stopped" in e["message"] for e in events):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the worker did not stop within 10 s")
    latency = time.time() - cancelled_at
    time.sleep(1.5)  # nothing more arrives after the stop
    final = live.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    trained = [p["step"] for p in live.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics?name=loss").json()["data"]]
    assert final["status"] == "cancelled" and final["fine_tuned_model"] is None
    assert max(trained) <= step_at_cancel + 1, (step_at_cancel, trained[-5:])  # at most the step in flight
    assert final["progress"]["step"] <= step_at_cancel + 1
    assert latency < 5
    # the worker is free again: a small job runs to completion
    f2 = live.upload(PREFERENCE_ROWS)
    nxt = live.create_job({"model": "tiny-random-llama", "training_file": f2["id"],
                           "method": {"type": "dpo", "dpo": {"hyperparameters": {"max_steps": 1}}}})
    assert wait_for_job(live.get, nxt["id"], timeout=120)["status"] == "succeeded"
