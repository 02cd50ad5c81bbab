"""Shared fixtures: one real Ray instance for the whole test session (started once, not per test).

The pipeline tests run the real runner and CLI against a DAG of small Parquet stages (tests/parquet_stages.py).
Ray workers inherit this process's environment at `ray.init`, which is how they find the test stages
(PYTHONPATH), the fault-injection directory and the execution ledger; CLI subprocesses join the same instance
through RAY_ADDRESS.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from tests.cluster import BIN, free_ports

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = "tests.parquet_stages:REGISTRY"
CONFIG_DIR = str(ROOT / "tests" / "conf")
TEST_DAG = ["--registry", REGISTRY, "--config-dir", CONFIG_DIR]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory: pytest.TempPathFactory):
    import ray

    fault_dir = tmp_path_factory.mktemp("faults")
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.txt"
    os.environ["GPTLINE_FAULT_DIR"] = str(fault_dir)
    os.environ["GPTLINE_TEST_LEDGER"] = str(ledger)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    context = ray.init(num_cpus=4, include_dashboard=False, namespace="gptline", log_to_driver=False)
    os.environ["RAY_ADDRESS"] = context.address_info["gcs_address"]
    yield SimpleNamespace(fault_dir=fault_dir, ledger=ledger)
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def default_data(tmp_path_factory: pytest.TempPathFactory, ray_session: SimpleNamespace) -> Path:
    """A store holding the default data chain (fetch, crawl_mix, tokenizer, tokenize) as `make run` builds it, built
    once for the slow group: the registry downloads and the pydoc crawl are the slowest part of every test that needs
    the default corpus. Tests read it or build downstream of it; none builds another variant of those stages there."""
    from gptline.cli.main import main

    store = tmp_path_factory.mktemp("default-data") / "store"
    assert main(["run", f"store.root={store}", "tracking=disabled", "run.quiet=true", "--until", "tokenize"]) == 0
    return store


class Pipeline:
    """Drives the real CLI (in this process) against one test's own store."""

    def __init__(self, store: Path, ray_session: SimpleNamespace, capsys: pytest.CaptureFixture):
        self.store, self.ray, self.capsys = store, ray_session, capsys

    def run(self, *args: str) -> int:
        from gptline.cli.main import main

        return main(["run", *TEST_DAG, f"store.root={self.store}", "tracking=disabled", *args])

    def cli(self, *args: str) -> int:
        from gptline.cli.main import main

        return main([*args, "--store", str(self.store)])

    def resume(self, run_id: str, *args: str) -> int:
        """`gptline resume` of a run of the test DAG (its registry and config given, as the record's are not run)."""
        from gptline.cli.main import main

        return main(["resume", run_id, *TEST_DAG, "--store", str(self.store), *args])

    def cli_plain(self, *args: str) -> int:
        """A subcommand with its own options, the store given as an override (`tune`)."""
        from gptline.cli.main import main

        return main([*args, f"store.root={self.store}", "tracking=disabled"])

    def start_driver(self, *args: str) -> subprocess.Popen:
        """`gptline run` of the test DAG in its own process (a driver to signal or kill); output captured."""
        command = [sys.executable, "-m", "gptline", "run", *TEST_DAG, f"store.root={self.store}", "tracking=disabled",
                   *args]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_for_chunk(self, driver: subprocess.Popen, chunk: int, seconds: float = 120) -> None:
        deadline = time.time() + seconds
        while f"chunk{chunk}" not in self.chunks_written():
            assert time.time() < deadline and driver.poll() is None, f"the driver never reached chunk {chunk}"
            time.sleep(0.1)

    def arm(self, fault: str) -> None:
        (self.ray.fault_dir / fault).touch()

    def _ledger(self) -> list[tuple[str, str]]:
        """(stage, event) lines that really executed against this store, in order."""
        if not self.ray.ledger.exists():
            return []
        lines = [line.split() for line in self.ray.ledger.read_text().splitlines()]
        return [(stage, event) for stage, event, store in lines if store == str(self.store)]

    def executions(self) -> list[str]:
        return [stage for stage, event in self._ledger() if event == "start"]

    def chunks_written(self) -> list[str]:
        return [event for _, event in self._ledger() if event.startswith("chunk")]

    def latest_run(self) -> str:
        return sorted(p.name for p in (self.store / "runs").iterdir())[-1]


@pytest.fixture
def pipeline(tmp_path: Path, ray_session: SimpleNamespace, capsys: pytest.CaptureFixture) -> Pipeline:
    yield Pipeline(tmp_path / "store", ray_session, capsys)
    for marker in ray_session.fault_dir.iterdir():  # a fault a test armed but did not trigger
        marker.unlink()


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real sentencepiece tokenizer with the chat markers (trained on Shakespeare)."""
    from tests.test_tokenizer import shakespeare_docs, train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("chat-tok"), shakespeare_docs()[:800], vocab_size=400)


@pytest.fixture(scope="session")
def template(tok: Path):
    from gptline.data.chat import ChatTemplate

    return ChatTemplate(tok)


@pytest.fixture
def s3_store(monkeypatch):
    """An S3 server on this machine (moto's) with an empty bucket: the store URI every node and process opens."""
    [port] = free_ports(1)
    server = subprocess.Popen([str(BIN / "moto_server"), "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    for name, value in (("AWS_ACCESS_KEY_ID", "gptline"), ("AWS_SECRET_ACCESS_KEY", "gptline"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):  # fmt: skip
        monkeypatch.setenv(name, value)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "moto_server did not start"
            time.sleep(0.3)
    uri = f"s3://gptline/store?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    bucket, _ = pafs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")
    bucket.create_dir("gptline")
    yield uri
    server.terminate()
    server.wait(timeout=30)
