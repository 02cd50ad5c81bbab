"""`gptline submit` against a real two-node Ray cluster on this machine (token auth on): the run's stages are spread
over both nodes, its artifacts land in the shared store, and a worker node killed mid-run is survived (Ray retries
the stage on the node that is left, or `gptline resume` finishes the run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster import TwoNodeCluster
from tests.conftest import CONFIG_DIR, REGISTRY, ROOT


@pytest.fixture
def cluster(request):
    # A short root: Ray's unix sockets live under the temp dir and their paths must stay under 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="gl-ray-", dir="/tmp"))
    nodes = TwoNodeCluster(root, **getattr(request, "param", {})).start()
    yield nodes
    nodes.stop()
    shutil.rmtree(root, ignore_errors=True)


def submit(cluster: TwoNodeCluster, store: Path, *overrides: str, wait: bool = True) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "submit", "--address", cluster.dashboard, "--registry", REGISTRY,
               "--config-dir", os.path.relpath(CONFIG_DIR, ROOT), f"store.root={store}", "tracking=disabled",
               *overrides]  # fmt: skip
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        process.wait(timeout=600)
    return process


def run_id_of(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("submitted run "))
    return line.split()[2]


def node_ids(store: Path, run_id: str) -> dict[str, str]:
    nodes = store / "runs" / run_id / "nodes"
    return {p.stem: json.loads(p.read_text()).get("node_id", "") for p in nodes.glob("*.json")}


@pytest.mark.slow
def test_submit_runs_on_both_nodes_and_commits_to_the_shared_store(cluster, tmp_path):
    store = tmp_path / "store"
    # Each node has one CPU: squares and evens, ready together, can only run at once on different nodes.
    process = submit(cluster, store, "squares.delay_s=5", "evens.delay_s=5")
    output = process.stdout.read()
    assert process.returncode == 0, output
    run_id = run_id_of(output)
    assert f"run {run_id}: done" in output  # the job's own log, streamed back
    meta = json.loads((store / "runs" / run_id / "run.json").read_text())
    assert meta["status"] == "done"
    ids = node_ids(store, run_id)
    assert set(ids) == {"numbers", "squares", "evens", "total"} and len(set(ids.values())) == 2, ids
    for stage in ids:
        [version] = [p for p in (store / stage).iterdir() if (p / "manifest.json").exists()]
        assert version.name == dict(meta["nodes"])[stage]


@pytest.mark.slow
@pytest.mark.parametrize("cluster", [{"head_cpus": 0}], indirect=True)  # every stage runs on the worker node
def test_a_worker_node_killed_mid_run_is_survived(cluster, tmp_path):
    store = tmp_path / "store"
    process = submit(cluster, store, "numbers.chunks=12", "numbers.delay_s=1.0", wait=False)
    wait_for_chunk(process, store, 2)  # numbers is well under way
    killed_node = node_ids(store, run_id_of_store(store))["numbers"]
    cluster.kill_worker()
    cluster.add_worker()  # the replacement a cluster's autoscaler would start
    output = process.communicate(timeout=600)[0]
    run_id = run_id_of(output)
    meta = json.loads((store / "runs" / run_id / "run.json").read_text())
    if meta["status"] != "done":  # Ray could not retry in time: the run failed and resume finishes it
        resume(cluster, store, run_id)
        meta = json.loads((store / "runs" / run_id / "run.json").read_text())
    assert meta["status"] == "done", output
    for stage in ("numbers", "squares", "evens", "total"):
        assert len([p for p in (store / stage).iterdir() if (p / "manifest.json").exists()]) == 1
    assert node_ids(store, run_id)["numbers"] != killed_node  # finished on the replacement node
    [numbers] = [p for p in (store / "numbers").iterdir() if (p / "manifest.json").exists()]
    assert len(list(numbers.glob("chunk-*.parquet"))) == 12


def wait_for_chunk(process: subprocess.Popen, store: Path, chunk: int) -> None:
    deadline = time.time() + 300  # a cold cluster on 2 busy cores can take minutes to reach the numbers stage
    while not list((store / "numbers").glob(f"*.partial/chunk-{chunk:04d}.parquet")):
        if time.time() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail(f"numbers never reached chunk {chunk}; the submission printed:\n{process.communicate()[0]}")
        time.sleep(0.5)


def resume(cluster: TwoNodeCluster, store: Path, run_id: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", "resume", run_id, "--store", str(store)], cwd=ROOT,
                          env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_sigterm_to_submit_stops_the_job_gracefully_and_resume_finishes_it(cluster, tmp_path):
    store = tmp_path / "store"
    process = submit(cluster, store, "numbers.chunks=12", "numbers.delay_s=1.0", wait=False)
    wait_for_chunk(process, store, 2)
    process.send_signal(signal.SIGTERM)  # what Slurm's --signal sends the batch script (cluster/slurm.sbatch)
    output = process.communicate(timeout=300)[0]
    run_id = run_id_of(output)
    assert process.returncode == 1 and f"Ray job gptline-{run_id} stopped" in output, output
    assert f"gptline resume {run_id}" in output
    meta = json.loads((store / "runs" / run_id / "run.json").read_text())
    assert meta["status"] == "failed" and "stopped by SIGTERM" in meta["error"], meta
    numbers = json.loads((store / "runs" / run_id / "nodes" / "numbers.json").read_text())
    assert "asked to stop and stopped after chunk" in numbers["error"], numbers  # ended cleanly, not killed
    [partial] = (store / "numbers").glob("*.partial")
    written = len(list(partial.glob("chunk-*.parquet")))
    assert 3 <= written < 12

    resume(cluster, store, run_id)
    meta = json.loads((store / "runs" / run_id / "run.json").read_text())
    assert meta["status"] == "done"
    [numbers] = [p for p in (store / "numbers").iterdir() if (p / "manifest.json").exists()]
    assert len(list(numbers.glob("chunk-*.parquet"))) == 12


def run_id_of_store(store: Path) -> str:
    return sorted(p.name for p in (store / "runs").iterdir())[-1]
