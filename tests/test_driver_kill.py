"""A SIGKILLed driver: the run record says so, and `gptline resume` finishes the run (slow group)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.artifacts import Store
from tests.conftest import ROOT, TEST_DAG


@pytest.mark.slow
def test_resume_finishes_a_run_whose_driver_was_killed(pipeline):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        *(sys.executable, "-m", "pipeline", "run", *TEST_DAG),
        *(f"store.root={pipeline.store}", "tracking=disabled", "numbers.delay_s=1.0"),
    ]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while "chunk0" not in pipeline.chunks_written():
        assert time.time() < deadline and driver.poll() is None, "the driver never reached the first chunk"
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    run_id = pipeline.latest_run()
    assert pipeline.cli("status", run_id) == 0
    assert "driver gone" in pipeline.capsys.readouterr().out
    assert pipeline.cli("resume", run_id) == 0
    assert pipeline.chunks_written() == ["chunk0", "chunk1", "chunk2", "chunk3"]  # nothing redone
    assert sorted(set(pipeline.executions())) == ["evens", "numbers", "squares", "total"]
    assert [pipeline.executions().count(s) for s in ("squares", "evens", "total")] == [1, 1, 1]
    assert len(Store(str(pipeline.store)).list()) == 4
    pipeline.cli("status", run_id)
    assert f"run {run_id}: done" in pipeline.capsys.readouterr().out
