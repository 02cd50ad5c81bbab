"""Leases and gc: a torn lease expires, gc never touches a version being built or a run's resumable work (local
and object store), `--rebuild` is not repeated by a Ray retry, and an object store is written by one cluster."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from pipeline.artifacts import LeaseFile, Store
from pipeline.errors import StoreError


@pytest.mark.parametrize("content", [b"", b'{"owner": "x", "heart'])
def test_an_empty_or_torn_lease_is_taken_over_after_its_ttl(tmp_path, content):
    path = tmp_path / "x.lock"
    path.write_bytes(content)  # a crash just after the O_EXCL create, or ENOSPC on close
    lease = LeaseFile(path, ttl_s=2, heartbeat_s=0.5)
    thread = threading.Thread(target=lease.acquire, daemon=True)
    start = time.time()
    thread.start()
    thread.join(timeout=8)
    assert not thread.is_alive(), "the torn lease was still taken for fresh after 8 s"
    assert 1.5 < time.time() - start < 8 and json.loads(path.read_text())["owner"] == lease.owner
    lease.release()


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_store")


def test_gc_never_touches_a_version_being_built_nor_a_young_partial_directory(store_uri, capsys):
    from gptline.cli.main import main

    store = Store(store_uri)
    building, young = store.partial_path("squares", "0" * 12), store.partial_path("squares", "1" * 12)
    for partial in (building, young):
        store.write_bytes(partial + "/transient/checkpoint.bin", b"weights")
    with store.lock("squares", "0" * 12, ttl_s=30, heartbeat_s=0.2):
        assert main(["gc", "--store", store_uri]) == 0
        assert store.exists(young + "/transient/checkpoint.bin") and "within --min-age-s" in capsys.readouterr().out
        assert main(["gc", "--store", store_uri, "--force", "--min-age-s", "0"]) == 0
        assert store.exists(building + "/transient/checkpoint.bin") and "build lease is live" in capsys.readouterr().out
        assert not store.exists(young)
    assert main(["gc", "--store", store_uri, "--min-age-s", "0"]) == 0
    assert store.uncommitted() == [] and store.leases(ttl_s=30) == {}


def test_an_object_store_is_written_by_one_cluster_at_a_time(s3_store):
    store = Store(s3_store)
    store.claim_writer("cluster-a", ttl_s=30)
    store.claim_writer("cluster-a", ttl_s=30)  # its other drivers
    with pytest.raises(StoreError, match="another Ray cluster.*cluster-a"):
        store.claim_writer("cluster-b", ttl_s=30)
    store.release_writer("cluster-a")
    store.claim_writer("cluster-b", ttl_s=30)


def test_a_ray_retry_after_the_commit_keeps_the_rebuilt_artifact(pipeline):
    assert pipeline.run() == 0
    pipeline.arm("commit.squares.before_cleanup")  # the rebuilt artifact is committed, then the task dies
    assert pipeline.run("--rebuild", "squares", "run.max_retries=1") == 0
    assert pipeline.executions().count("squares") == 2  # the first run and the rebuild, not a rebuild per attempt
    [squares] = Store(str(pipeline.store)).list("squares")
    assert squares.manifest["run_id"] == pipeline.latest_run()


@pytest.mark.slow
def test_gc_keeps_the_partial_work_of_a_run_stopped_by_sigterm(pipeline):
    driver = pipeline.start_driver("numbers.chunks=6", "numbers.delay_s=1.0")
    pipeline.wait_for_chunk(driver, 1)
    run_id = pipeline.latest_run()
    node = json.loads((pipeline.store / "runs" / run_id / "nodes" / "numbers.json").read_text())
    os.kill(node["pid"], signal.SIGTERM)  # the stage checkpoints and stops; the run waits for `resume`
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 1, output
    [partial] = pipeline.store.glob("numbers/*.partial")
    written = pipeline.chunks_written()
    assert pipeline.cli("gc", "--min-age-s", "0") == 0
    assert partial.is_dir()
    assert pipeline.resume(run_id) == 0
    assert pipeline.chunks_written() == [f"chunk{i}" for i in range(6)] and 2 <= len(written) < 6
