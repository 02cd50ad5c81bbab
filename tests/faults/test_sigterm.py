"""SIGTERM, the preemption notice Slurm, Kubernetes and people send before a kill: a stage that stops on request
checkpoints, ends its node cleanly with a message, and resume continues from that checkpoint (slow group).

The signal goes to the stage's own process (the pid its node record holds), the process that owns the stage's
work; training workers see the request through the stage's work directory."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from pipeline.dag import STOP_REQUEST, stop_on_sigterm
from pipeline.errors import StageStopped
from tests.test_pretrain import inputs, losses, train  # noqa: F401 (inputs is a fixture)


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"never saw {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_to_a_running_stage_stops_it_cleanly_and_resume_finishes_without_redoing_work(pipeline):
    driver = pipeline.start_driver("numbers.chunks=6", "numbers.delay_s=1.0")
    pipeline.wait_for_chunk(driver, 1)
    run_id = pipeline.latest_run()
    node = json.loads((pipeline.store / "runs" / run_id / "nodes" / "numbers.json").read_text())
    os.kill(node["pid"], signal.SIGTERM)
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 1, output  # a failed node, not a stopped run: the driver got no signal
    node = json.loads((pipeline.store / "runs" / run_id / "nodes" / "numbers.json").read_text())
    assert node["state"] == "failed" and "asked to stop and stopped after chunk" in node["error"], node
    written = pipeline.chunks_written()
    assert 2 <= len(written) < 6 and not list(pipeline.store.glob("numbers/*.partial/" + STOP_REQUEST))

    assert pipeline.resume(run_id) == 0
    assert pipeline.chunks_written() == [f"chunk{i}" for i in range(6)]  # the rest, none twice
    assert [pipeline.executions().count(s) for s in ("squares", "evens", "total")] == [1, 1, 1]


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_the_running_stage_cancels_the_rest_and_resume_finishes(pipeline):
    driver = pipeline.start_driver("numbers.chunks=6", "numbers.delay_s=1.0")
    pipeline.wait_for_chunk(driver, 1)
    driver.send_signal(signal.SIGTERM)
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 2 and "was stopped by SIGTERM; `gptline resume" in output, output
    run_id = pipeline.latest_run()
    nodes = {s: json.loads((pipeline.store / "runs" / run_id / "nodes" / f"{s}.json").read_text())
             for s in ("numbers", "squares", "evens", "total")}  # fmt: skip
    assert "asked to stop and stopped after chunk" in nodes["numbers"]["error"], nodes["numbers"]
    assert all(n["state"] == "failed" for n in nodes.values()), nodes
    assert pipeline.executions() == ["numbers"]  # nothing downstream started
    assert 2 <= len(pipeline.chunks_written()) < 6

    assert pipeline.resume(run_id) == 0
    assert pipeline.chunks_written() == [f"chunk{i}" for i in range(6)]
    assert [pipeline.executions().count(s) for s in ("squares", "evens", "total")] == [1, 1, 1]


@ray.remote(num_cpus=0)
def train_until_stopped(stage_inputs: dict, out: Path, overrides: dict) -> str:
    """pretrain as the runner runs a stage that stops on request: in a Ray task's main thread, under
    stop_on_sigterm."""
    out.mkdir(parents=True)
    (out.parent / "pid").write_text(str(os.getpid()))
    try:
        with stop_on_sigterm(out, "pretrain"):
            train(stage_inputs, out, workers=2, exist_ok=True, **overrides)
    except StageStopped as e:
        return str(e)
    return "not stopped"


@pytest.mark.slow
def test_sigterm_mid_pretrain_checkpoints_there_and_the_resume_is_exact(inputs, tmp_path, ray_session):  # noqa: F811
    # ~20 ms a step: enough of them for the signal to land mid-run; no scheduled checkpoint before the end
    overrides = {"steps": 200, "eval_every": 50, "sample_every": 200, "checkpoint_every": 1000}
    train(inputs, tmp_path / "straight", workers=2, **overrides)
    out = tmp_path / "stopped"
    stopped = train_until_stopped.remote(inputs, out, overrides)
    wait_for(lambda: (out / "train_log.jsonl").exists() and len(losses(out)) >= 3, 300, "step 3 of pretrain")
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)
    message = ray.get(stopped, timeout=300)
    assert "asked to stop (SIGTERM) and stopped after step" in message, message
    step = int(message.split("after step ")[1].split()[0])
    assert 3 <= step < 200 and len(losses(out)) == step
    assert (out / "transient" / "checkpoints").is_dir() and not (out / STOP_REQUEST).exists()

    train(inputs, out, workers=2, exist_ok=True, **overrides)  # the resume: from the checkpoint written at `step`
    a, b = losses(tmp_path / "straight"), losses(out)
    assert len(a) == len(b) == 200 and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "straight", out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
