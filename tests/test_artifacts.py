"""The artifact store on real filesystems: commit, verification, listing, lineage and build leases."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.artifacts import LeaseFile, Store, artifact_version
from pipeline.errors import CorruptArtifactError, StoreError


def build(store: Store, stage: str, version: str, files: dict[str, bytes], inputs=None, scratch=None) -> None:
    workdir, _ = store.open_workdir(stage, version, scratch or Path("/nonexistent"))
    for rel, data in files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_bytes(data)
    store.save_partial(stage, version, workdir)
    store.commit(stage, version, workdir, {"config": {}, "inputs": inputs or {}, "metrics": {"n": 1}})


def test_version_is_a_pure_function_of_its_identity():
    base = artifact_version("pretrain", 1, {"lr": 0.001, "steps": 10}, {"tokenize": "abc"})
    assert base == artifact_version("pretrain", 1, {"steps": 10, "lr": 1e-3}, {"tokenize": "abc"})
    assert len(base) == 12
    assert base != artifact_version("pretrain", 2, {"lr": 0.001, "steps": 10}, {"tokenize": "abc"})
    assert base != artifact_version("pretrain", 1, {"lr": 0.002, "steps": 10}, {"tokenize": "abc"})
    assert base != artifact_version("pretrain", 1, {"lr": 0.001, "steps": 10}, {"tokenize": "abd"})
    assert base != artifact_version("sft", 1, {"lr": 0.001, "steps": 10}, {"tokenize": "abc"})


def test_commit_writes_manifest_with_checksums_and_renames_atomically(tmp_path):
    store = Store(str(tmp_path / "store"))
    build(store, "numbers", "0123456789ab", {"a.bin": b"hello", "sub/b.bin": b"world!"})
    assert store.is_committed("numbers", "0123456789ab")
    assert not store.has_partial("numbers", "0123456789ab")
    artifact = store.load("numbers", "0123456789ab", verify="full")
    files = artifact.manifest["files"]
    assert files["a.bin"]["size"] == 5 and files["sub/b.bin"]["size"] == 6
    assert files["a.bin"]["sha256"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    for key in ("code_revision", "host", "metrics", "config", "inputs", "stage", "version"):
        assert key in artifact.manifest
    with pytest.raises(StoreError, match="already committed"):
        build(store, "numbers", "0123456789ab", {"a.bin": b"again"})


def test_flipped_byte_and_truncation_are_detected_naming_the_file(tmp_path):
    store = Store(str(tmp_path / "store"))
    build(store, "numbers", "0123456789ab", {"a.bin": b"x" * 1000})
    target = tmp_path / "store" / "numbers" / "0123456789ab" / "a.bin"
    data = bytearray(target.read_bytes())
    data[500] ^= 0x01
    target.write_bytes(bytes(data))
    store.load("numbers", "0123456789ab", verify="size")  # same size: the cheap check cannot see it
    with pytest.raises(CorruptArtifactError, match=str(target)):
        store.load("numbers", "0123456789ab", verify="full")
    target.write_bytes(b"short")
    with pytest.raises(CorruptArtifactError, match="a.bin: size 5 bytes"):
        store.load("numbers", "0123456789ab", verify="size")
    target.unlink()
    with pytest.raises(CorruptArtifactError, match="a.bin: missing"):
        store.load("numbers", "0123456789ab")


def test_listing_find_and_lineage(tmp_path):
    store = Store(str(tmp_path / "store"))
    build(store, "numbers", "aaaaaaaaaaaa", {"a": b"1"})
    build(store, "squares", "bbbbbbbbbbbb", {"b": b"2"}, inputs={"numbers": "aaaaaaaaaaaa"})
    (tmp_path / "store" / "squares" / "cccccccccccc.partial").mkdir()
    assert [a.ref for a in store.list()] == ["numbers/aaaaaaaaaaaa", "squares/bbbbbbbbbbbb"]
    assert store.find("squares/bbb").version == "bbbbbbbbbbbb"
    assert store.uncommitted() == [str(tmp_path / "store" / "squares" / "cccccccccccc.partial")]
    with pytest.raises(StoreError, match="no committed artifact"):
        store.find("squares/ccc")
    assert store.lineage("squares", "bbbbbbbbbbbb") == {
        "ref": "squares/bbbbbbbbbbbb",
        "inputs": [{"ref": "numbers/aaaaaaaaaaaa", "inputs": []}],
    }


def test_object_store_path_copies_then_writes_manifest_last(tmp_path):
    """A filesystem that is not LocalFileSystem takes the object-store commit path (no rename)."""
    (tmp_path / "bucket").mkdir()
    store = Store("store", filesystem=pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()))
    assert not store.is_local
    scratch = tmp_path / "scratch"
    workdir, resumed = store.open_workdir("numbers", "0123456789ab", scratch)
    assert not resumed and workdir.is_relative_to(scratch)
    (workdir / "ckpt.bin").write_bytes(b"state")
    store.save_partial("numbers", "0123456789ab", workdir)
    workdir, resumed = store.open_workdir("numbers", "0123456789ab", scratch)
    assert resumed and (workdir / "ckpt.bin").read_bytes() == b"state"
    (workdir / "out.bin").write_bytes(b"result")
    store.commit("numbers", "0123456789ab", workdir, {"config": {}, "inputs": {}, "metrics": {}})
    assert not store.has_partial("numbers", "0123456789ab")
    artifact = store.load("numbers", "0123456789ab", verify="full")
    assert set(artifact.manifest["files"]) == {"ckpt.bin", "out.bin"}
    local = store.localize(artifact, scratch)
    assert (local / "out.bin").read_bytes() == b"result"
    (tmp_path / "bucket" / "store" / "numbers" / "0123456789ab" / "out.bin").write_bytes(b"resulT")
    with pytest.raises(CorruptArtifactError, match="out.bin"):
        store.load("numbers", "0123456789ab", verify="full")


def test_store_errors_are_clear(tmp_path):
    with pytest.raises(StoreError, match="scheme 'nosuch'"):
        Store("nosuch://bucket/path")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        Store(str(tmp_path / "file" / "store")).check_writable()
    with pytest.raises(StoreError, match="invalid stage name"):
        Store(str(tmp_path)).artifact_path("../etc", "0123456789ab")


def test_lease_excludes_a_second_holder_until_released(tmp_path):
    path = tmp_path / "x.lock"
    first = LeaseFile(path, ttl_s=60, heartbeat_s=0.05)
    first.acquire()
    acquired_at = []

    def contend():
        second = LeaseFile(path, ttl_s=60, heartbeat_s=0.05)
        second.acquire()
        acquired_at.append(time.time())
        second.release()

    thread = threading.Thread(target=contend)
    thread.start()
    time.sleep(0.5)
    assert not acquired_at  # still waiting: the heartbeat keeps the first lease fresh
    released_at = time.time()
    first.release()
    thread.join(timeout=10)
    assert acquired_at and acquired_at[0] >= released_at
    assert not path.exists()


def test_lease_of_a_dead_process_or_an_expired_one_is_taken_over(tmp_path):
    path = tmp_path / "x.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {
        "owner": "gone",
        "host": socket.gethostname(),
        "pid": int(dead.stdout),
        "heartbeat": time.time(),
    }
    path.write_text(json.dumps(record))
    lease = LeaseFile(path, ttl_s=3600, heartbeat_s=1)
    start = time.time()
    lease.acquire()
    assert time.time() - start < 2  # no waiting for the TTL when the holder is known dead
    lease.release()

    path.write_text(json.dumps({"owner": "far", "host": "other-host", "pid": 1, "heartbeat": time.time() - 100}))
    lease = LeaseFile(path, ttl_s=5, heartbeat_s=1)
    lease.acquire()
    assert json.loads(path.read_text())["owner"] == lease.owner
    lease.release()


def test_node_mirror_moves_work_files_and_inputs_between_a_node_and_the_object_store(tmp_path):
    store = Store("store", filesystem=pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()))
    build(store, "numbers", "a" * 12, {"data.txt": b"123", "sub/more.txt": b"4"}, scratch=tmp_path / "build")
    artifact = store.load("numbers", "a" * 12)
    node_a, node_b = tmp_path / "node-a" / "work", tmp_path / "node-b" / "work"
    node_a.mkdir(parents=True)
    (node_a / "log.txt").write_text("step 1\n")
    on_a = store.mirror("squares", "b" * 12, node_a, {tmp_path / "node-a" / "in": artifact})
    on_a.push(["log.txt"])
    assert on_a.list() == ["log.txt"] and on_a.exists("log.txt") and on_a.read_text("log.txt") == "step 1\n"
    # node b sees the same paths as its own directories (a different disk on a real cluster)
    on_b = store.mirror("squares", "b" * 12, node_b, {tmp_path / "node-b" / "in": artifact})
    on_b.pull(on_b.list())
    on_b.pull_inputs()
    assert (node_b / "log.txt").read_text() == "step 1\n"
    assert (tmp_path / "node-b" / "in" / "sub" / "more.txt").read_bytes() == b"4"
    assert (tmp_path / "node-b" / "in" / "manifest.json").exists()
    on_b.delete("log.txt")
    assert not on_a.exists("log.txt") and on_a.read_text("log.txt") is None
    assert not Store(str(tmp_path / "local")).mirror("squares", "b" * 12, node_a, {}).enabled
