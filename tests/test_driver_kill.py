"""A SIGKILLed driver: the run record says so, and `gptline resume` finishes the run (slow group)."""

from __future__ import annotations

import signal

import pytest

from pipeline.artifacts import Store


@pytest.mark.slow
def test_resume_finishes_a_run_whose_driver_was_killed(pipeline):
    driver = pipeline.start_driver("numbers.delay_s=1.0")
    pipeline.wait_for_chunk(driver, 0)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()

    run_id = pipeline.latest_run()
    assert pipeline.cli("status", run_id) == 0
    assert "driver gone" in pipeline.capsys.readouterr().out
    assert pipeline.resume(run_id) == 0
    assert pipeline.chunks_written() == ["chunk0", "chunk1", "chunk2", "chunk3"]  # nothing redone
    assert sorted(set(pipeline.executions())) == ["evens", "numbers", "squares", "total"]
    assert [pipeline.executions().count(s) for s in ("squares", "evens", "total")] == [1, 1, 1]
    assert len(Store(str(pipeline.store)).list()) == 4
    pipeline.cli("status", run_id)
    assert f"run {run_id}: done" in pipeline.capsys.readouterr().out
