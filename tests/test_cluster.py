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

import pyarrow.fs as pafs
import pytest

from pipeline.artifacts import Store
from tests.cluster import TwoNodeCluster
from tests.conftest import CONFIG_DIR, REGISTRY, ROOT, TEST_DAG
from tests.s3_training import INPUT_VERSIONS
from tests.test_pretrain import inputs  # noqa: F401 (a fixture)


@pytest.fixture
def cluster(request):
    # A short root: Ray's unix sockets live under the temp dir and their paths must stay under 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="gl-ray-", dir="/tmp"))
    params = dict(getattr(request, "param", {}))
    if params.pop("private_scratch", False):  # root/scratch: the worker node has its own (root/worker1-private)
        params["private_dir"] = root / "scratch"
    nodes = TwoNodeCluster(root, **params).start()
    yield nodes
    nodes.stop()
    shutil.rmtree(root, ignore_errors=True)


def submit(cluster: TwoNodeCluster, store: Path, *overrides: str, wait: bool = True) -> subprocess.Popen:
    command = [sys.executable, "-m", "gptline", "submit", "--address", cluster.dashboard, "--registry", REGISTRY,
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
    done = subprocess.run([sys.executable, "-m", "gptline", "resume", run_id, *TEST_DAG, "--store", str(store),
                           "cluster=remote"], cwd=ROOT,
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


def train_on_cluster(cluster: TwoNodeCluster, store_uri: str, version: str, fault_dir: Path, tmp_path: Path,
                     *args: str, wait: bool = True) -> subprocess.Popen:  # fmt: skip
    """tests/s3_training.py against the cluster; the result lands in tmp_path/VERSION.json (the pid file beside it)."""
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(ROOT), "GPTLINE_FAULT_DIR": str(fault_dir)}
    command = [sys.executable, "-m", "tests.s3_training", cluster.gcs_address, store_uri, str(cluster.private_dir),
               str(tmp_path / f"{version}.json"), version, *args]  # fmt: skip
    log = open(tmp_path / f"{version}.log", "w")  # noqa: SIM115 (a file, not a pipe nobody drains while it runs)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if wait:
        process.wait(timeout=900)
        assert process.returncode == 0, (tmp_path / f"{version}.log").read_text()[-8000:]
    return process


def training_result(tmp_path: Path, version: str) -> dict:
    return json.loads((tmp_path / f"{version}.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the worker node's own scratch disk is a private bind mount: needs root")
@pytest.mark.parametrize("cluster", [{"private_scratch": True}], indirect=True)
def test_training_on_nodes_without_a_shared_disk_checkpoints_to_the_object_store(cluster, s3_store, inputs, tmp_path):  # noqa: F811
    """pretrain with one ZeRO-3 rank per node, each node with its own scratch disk, the store on S3: the other
    node's rank gets the inputs from the store, every rank's checkpoint files go to the store, a rank killed after
    step 4's checkpoint restarts from the store's copy (the losses equal the straight run's), and the weights rank 0
    wrote, wherever it ran, are what the stage's task commits."""
    store = Store(s3_store)
    for name, version in INPUT_VERSIONS.items():
        store.commit(name, version, inputs[name], {})
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    zero3 = 'deepspeed={"zero_stage": 3}'
    train_on_cluster(cluster, s3_store, "a" * 12, fault_dir, tmp_path, zero3)
    (fault_dir / "pretrain.after_checkpoint_4").touch()  # one rank dies right after step 4's checkpoint
    train_on_cluster(cluster, s3_store, "b" * 12, fault_dir, tmp_path, zero3)
    straight, resumed = training_result(tmp_path, "a" * 12), training_result(tmp_path, "b" * 12)
    assert not (fault_dir / "pretrain.after_checkpoint_4").exists()  # the fault fired

    def committed(version: str, name: str) -> bytes:
        with store.fs.open_input_stream(f"{store.artifact_path('pretrain', version)}/{name}") as f:
            return f.read()

    for result, version in ((straight, "a" * 12), (resumed, "b" * 12)):
        assert {"model.safetensors", "config.json", "train_log.jsonl", "final.json"} <= set(result["files"]), result
        assert not any(f.startswith("checkpoints/") for f in result["files"])
        steps = [json.loads(line) for line in committed(version, "train_log.jsonl").decode().splitlines()]
        assert [s["step"] for s in steps][-1] == 8
    straight_losses = [json.loads(x)["loss"] for x in committed("a" * 12, "train_log.jsonl").decode().splitlines()]
    resumed_losses = [json.loads(x)["loss"] for x in committed("b" * 12, "train_log.jsonl").decode().splitlines()]
    assert resumed_losses[-4:] == pytest.approx(straight_losses[-4:], abs=1e-6)
    assert committed("a" * 12, "model.safetensors") == committed("b" * 12, "model.safetensors")
    # Each node has its own scratch, and both localized the inputs from the store.
    for scratch in (cluster.root / "scratch", cluster.root / "worker1-private"):
        assert (scratch / "inputs" / "tokenize" / INPUT_VERSIONS["tokenize"] / "manifest.json").exists(), scratch


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the worker node's own scratch disk is a private bind mount: needs root")
@pytest.mark.parametrize("cluster", [{"private_scratch": True, "head_cpus": 0}], indirect=True)
def test_sigterm_reaches_training_ranks_on_other_nodes_through_the_object_store(cluster, s3_store, inputs, tmp_path):  # noqa: F811
    """The stage's task on the head node, its only rank on the worker node (no CPU on the head): SIGTERM to the task
    writes the stop request into its node's scratch and the store; the rank sees it there, checkpoints and stops,
    and running the stage again resumes from that checkpoint in the store and finishes."""
    store = Store(s3_store)
    for name, version in INPUT_VERSIONS.items():
        store.commit(name, version, inputs[name], {})
    # Long enough that the rank, which polls the store every 5 s, sees the request well before the end (~30 ms a
    # step: the request lands about 150 steps in).
    version, steps = "c" * 12, 600
    args = ("--workers", "1", f"steps={steps}", f"eval_every={steps}", f"sample_every={steps}", "checkpoint_every=5000")
    process = train_on_cluster(cluster, s3_store, version, tmp_path, tmp_path, *args, wait=False)
    log = cluster.root / "worker1-private" / "pretrain" / f"{version}.partial" / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 5):
        assert time.time() < deadline and process.poll() is None, (tmp_path / f"{version}.log").read_text()[-8000:]
        time.sleep(0.5)
    os.kill(int((tmp_path / f"{version}.json.pid").read_text()), signal.SIGTERM)
    process.wait(timeout=600)
    stopped = training_result(tmp_path, version)
    assert "was asked to stop (SIGTERM) and stopped after step" in stopped.get("error", ""), stopped
    step = int(stopped["error"].split("stopped after step ")[1].split()[0])
    assert 5 <= step < steps
    marker = store.fs.get_file_info(f"{store.partial_path('pretrain', version)}/STOP_REQUEST")
    assert marker.type == pafs.FileType.NotFound  # withdrawn once the stage ended
    train_on_cluster(cluster, s3_store, version, tmp_path, tmp_path, *args)
    finished = training_result(tmp_path, version)
    assert finished["resumed"] and "model.safetensors" in finished["files"], finished
    with store.fs.open_input_stream(f"{store.artifact_path('pretrain', version)}/train_log.jsonl") as f:
        logged = [json.loads(line)["step"] for line in f.read().decode().splitlines()]
    assert logged == list(range(1, steps + 1))  # the log as far as the checkpoint, then the resumed steps
