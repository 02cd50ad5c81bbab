"""The runner and CLI on a real Ray instance, with real Parquet stages, real processes and real crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts import Store
from tests.conftest import ROOT, TEST_DAG


def node_states(store: Path, run_id: str) -> dict[str, str]:
    nodes = store / "runs" / run_id / "nodes"
    return {p.stem: json.loads(p.read_text())["state"] for p in nodes.iterdir()}


def test_first_run_builds_every_stage_and_second_run_reuses_all(pipeline):
    assert pipeline.run() == 0
    assert sorted(pipeline.executions()) == ["evens", "numbers", "squares", "total"]
    first = pipeline.latest_run()
    assert node_states(pipeline.store, first) == dict.fromkeys(["numbers", "squares", "evens", "total"], "done")
    committed = Store(str(pipeline.store)).list()
    assert len(committed) == 4
    [total] = Store(str(pipeline.store)).list("total")
    assert total.manifest["metrics"]["total"] > 0 and total.manifest["run_id"] == first

    assert pipeline.run() == 0
    assert len(pipeline.executions()) == 4  # nothing executed the second time
    second = pipeline.latest_run()
    assert second != first
    assert node_states(pipeline.store, second) == dict.fromkeys(["numbers", "squares", "evens", "total"], "reused")


def test_a_config_change_rebuilds_only_what_depends_on_it(pipeline):
    assert pipeline.run() == 0
    assert pipeline.run("squares.power=3") == 0
    assert sorted(pipeline.executions()[4:]) == ["squares", "total"]


def test_killed_stage_leaves_no_artifact_and_resume_continues_from_its_partial_work(pipeline):
    pipeline.arm("numbers.after_chunk_1")  # os._exit inside the stage after two of four chunks
    assert pipeline.run("run.max_retries=0") == 1
    run_id = pipeline.latest_run()
    store = Store(str(pipeline.store))
    assert store.list() == []
    [partial] = store.uncommitted()
    assert sorted(os.listdir(partial)) == ["chunk-0000.parquet", "chunk-0001.parquet"]
    assert node_states(pipeline.store, run_id)["numbers"] == "failed"
    assert node_states(pipeline.store, run_id)["total"] == "failed"  # never started: its input failed

    assert pipeline.resume(run_id) == 0
    assert sorted(pipeline.executions()) == ["evens", "numbers", "numbers", "squares", "total"]
    assert pipeline.chunks_written() == ["chunk0", "chunk1", "chunk2", "chunk3"]  # none written twice
    states = node_states(pipeline.store, run_id)
    assert states == dict.fromkeys(["numbers", "squares", "evens", "total"], "done")
    numbers_node = json.loads((pipeline.store / "runs" / run_id / "nodes" / "numbers.json").read_text())
    assert numbers_node["resumed"] is True
    assert len(store.list()) == 4 and store.uncommitted() == []


def test_ray_retries_a_killed_stage_which_resumes_within_the_same_run(pipeline):
    pipeline.arm("numbers.after_chunk_2")
    assert pipeline.run("run.max_retries=1") == 0
    assert pipeline.executions().count("numbers") == 2
    assert pipeline.chunks_written() == ["chunk0", "chunk1", "chunk2", "chunk3"]


@pytest.mark.parametrize("fault", ["commit.numbers.before_manifest", "commit.numbers.before_rename"])
def test_crash_between_outputs_and_manifest_commits_nothing(pipeline, fault):
    pipeline.arm(fault)
    assert pipeline.run("run.max_retries=0") == 1
    store = Store(str(pipeline.store))
    assert store.list() == []
    leftovers = [p.name for p in (pipeline.store / "numbers").iterdir() if p.is_dir()]
    assert len(leftovers) == 1 and leftovers[0].endswith(".partial")  # no committed-looking directory
    assert node_states(pipeline.store, pipeline.latest_run())["squares"] == "failed"
    assert pipeline.run() == 0  # the rerun completes from the partial outputs
    assert len(store.list()) == 4
    assert pipeline.chunks_written() == ["chunk0", "chunk1", "chunk2", "chunk3"]


def test_a_flipped_byte_in_an_input_is_detected_when_a_stage_reads_it(pipeline):
    assert pipeline.run() == 0
    store = Store(str(pipeline.store))
    [numbers] = store.list("numbers")
    victim = Path(numbers.path) / "chunk-0002.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    pipeline.capsys.readouterr()
    assert pipeline.run("squares.power=3") == 1  # squares must rebuild, so it reads numbers
    out = pipeline.capsys.readouterr().out
    assert f"{victim}: sha256 does not match" in out
    assert pipeline.executions().count("squares") == 1  # the failing attempt never ran the stage function
    assert pipeline.cli("show", f"numbers/{numbers.version}", "--verify") == 2
    assert str(victim) in pipeline.capsys.readouterr().err
    # The flag that recovers: rebuild the corrupt artifact (same version), then what needs it runs.
    assert pipeline.run("squares.power=3", "--rebuild", "numbers") == 0
    assert pipeline.capsys.readouterr().out.count("rebuild") >= 1
    store.verify(store.load("numbers", numbers.version), full=True)
    assert not list(Path(numbers.path).parent.glob("*.retired-*"))
    assert pipeline.executions().count("numbers") == 2


def test_two_runs_started_at_once_build_each_artifact_once(pipeline):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "gptline",
        "run",
        *TEST_DAG,
        f"store.root={pipeline.store}",
        "tracking=disabled",
        "numbers.delay_s=0.5",
    ]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(pipeline.executions()) == ["evens", "numbers", "squares", "total"]
    assert pipeline.chunks_written() == ["chunk0", "chunk1", "chunk2", "chunk3"]
    runs = sorted(p.name for p in (pipeline.store / "runs").iterdir())
    assert len(runs) == 2
    states = [node_states(pipeline.store, r) for r in runs]
    for stage in ["numbers", "squares", "evens", "total"]:  # one run built it, the other waited and reused it
        assert sorted(s[stage] for s in states) == ["done", "reused"]
    assert len(Store(str(pipeline.store)).list()) == 4


def test_selection_until_and_only(pipeline):
    assert pipeline.run("--until", "squares") == 0
    assert pipeline.executions() == ["numbers", "squares"]
    assert pipeline.run("--only", "total") == 2  # evens is not committed
    err = pipeline.capsys.readouterr().err
    assert "stage 'total' needs input 'evens'" in err and "not committed" in err
    assert pipeline.run("--only", "evens", "total") == 0
    assert pipeline.executions() == ["numbers", "squares", "evens", "total"]


def test_dry_run_prints_the_plan_and_starts_nothing(pipeline):
    assert pipeline.run("--dry-run") == 0
    out = pipeline.capsys.readouterr().out
    assert "numbers" in out and "run" in out
    assert not pipeline.store.exists() or not (pipeline.store / "runs").exists()
    assert pipeline.executions() == []
    assert pipeline.run("--until", "numbers") == 0
    pipeline.capsys.readouterr()
    assert pipeline.run("--dry-run") == 0
    plan = {line.split()[0]: line.split()[2] for line in pipeline.capsys.readouterr().out.splitlines()[3:]}
    assert plan == {"numbers": "reuse", "squares": "run", "evens": "run", "total": "run"}


@pytest.mark.parametrize("parallel", ["1", "3"])
def test_sweep_reuses_shared_upstream_artifacts(pipeline, parallel):
    """Three points over a knob of the last stage: the stages they share run once, also with points at once."""
    assert pipeline.run("-m", "total.scale=1.0,2.0,3.0", "numbers.delay_s=0.3", "--parallel", parallel) == 0
    assert sorted(pipeline.executions()) == sorted(["numbers", "squares", "evens", "total", "total", "total"])
    out = pipeline.capsys.readouterr().out
    summary = out[out.index("point  overrides") :]
    assert summary.count(" done ") == 3 and "total=" in summary  # the last stage's metric per point
    [shared] = [line for line in summary.splitlines() if line.startswith("shared by every point:")]
    assert [p.split("/")[0] for p in shared.split(": ")[1].split()] == ["numbers", "squares", "evens"]
    assert summary.count("total/") == 3


def test_status_shows_a_reused_stage_as_built_and_diff_names_what_each_change_rebuilt(pipeline):
    assert pipeline.run() == 0
    first = pipeline.latest_run()
    assert pipeline.run("squares.power=3", "tracking=offline") == 0
    second = pipeline.latest_run()
    pipeline.capsys.readouterr()
    assert pipeline.cli("status") == 0
    rows = {line.split()[0]: line for line in pipeline.capsys.readouterr().out.splitlines()[3:]}
    assert "reused (built" in rows["numbers"] and "ago)" in rows["numbers"] and "rows=4000" in rows["numbers"]
    assert "done" in rows["squares"] and "reused" not in rows["squares"]
    report = (pipeline.store / "runs" / second / "report.html").read_text()
    assert "rows=4000" in report  # the reused numbers' headline in the report's table too
    assert pipeline.cli("diff", first, second) == 0
    rows = {line.split()[0]: line for line in pipeline.capsys.readouterr().out.splitlines()[1:]}
    assert rows["squares.power"].split()[1:3] == ["2", "3"] and rows["squares.power"].endswith("rebuilt squares total")
    assert rows["tracking.mode"].endswith("not versioned")
    assert rows["same"].split(": ")[1].split()[0].startswith("numbers/")
    store = Store(str(pipeline.store))
    [a, b] = sorted(store.list("squares"), key=lambda x: x.manifest["config"]["power"])
    assert pipeline.cli("diff", a.ref, b.ref) == 0
    out = pipeline.capsys.readouterr().out
    assert "squares.power" in out and "versioned" in out and "content: DIFFERENT (" in out
    assert pipeline.cli("show", a.ref, "--verify") == 0
    assert f"content: {a.manifest['content']}" in pipeline.capsys.readouterr().out
    # The same version built in another store: the same files, and diff across the stores says so.
    from gptline.cli.main import main

    other = pipeline.store.parent / "other"
    assert main(["run", *TEST_DAG, f"store.root={other}", "tracking=disabled", "--until", "squares"]) == 0
    pipeline.capsys.readouterr()
    assert pipeline.cli("diff", a.ref, a.ref, "--other-store", str(other)) == 0
    assert f"content: identical ({a.manifest['content'][:12]})" in pipeline.capsys.readouterr().out


def test_status_ls_show_and_gc(pipeline):
    assert pipeline.run() == 0
    assert pipeline.run("numbers.seed=1") == 0
    pipeline.capsys.readouterr()
    assert pipeline.cli("status") == 0
    out = pipeline.capsys.readouterr().out
    assert ": done" in out.splitlines()[0]
    assert [line.split()[0] for line in out.splitlines()[3:]] == ["numbers", "squares", "evens", "total"]
    assert "rows=4000" in out
    assert pipeline.cli("ls") == 0
    assert pipeline.capsys.readouterr().out.count("numbers") == 2
    [old, new] = Store(str(pipeline.store)).list("total")
    assert pipeline.cli("show", f"total/{new.version[:6]}") == 0
    out = pipeline.capsys.readouterr().out
    assert '"sha256"' in out and "lineage:" in out and "└─ numbers/" in out

    # Forget the second run: its four artifacts become unreferenced; a crashed partial is garbage too.
    second = pipeline.latest_run()
    for path in sorted((pipeline.store / "runs" / second).rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (pipeline.store / "runs" / second).rmdir()
    (pipeline.store / "squares" / "0123456789ab.partial").mkdir()
    assert pipeline.cli("gc", "--dry-run", "--min-age-s", "0") == 0
    out = pipeline.capsys.readouterr().out
    assert out.count("would remove") == 5 and new.version in out and old.version not in out
    assert len(Store(str(pipeline.store)).list()) == 8
    assert pipeline.cli("gc", "--min-age-s", "0") == 0
    assert {a.ref for a in Store(str(pipeline.store)).list()} == {
        f"{a.stage}/{a.version}" for a in Store(str(pipeline.store)).list() if a.manifest["run_id"] != second
    }
    assert len(Store(str(pipeline.store)).list()) == 4
    assert Store(str(pipeline.store)).uncommitted() == []


def test_metrics_go_to_jsonl_and_to_an_offline_wandb_run(pipeline):
    from gptline.cli.main import main

    args = [
        "run",
        *TEST_DAG,
        f"store.root={pipeline.store}",
        "tracking=offline",
        "--until",
        "numbers",
    ]
    assert main(args) == 0
    run_dir = pipeline.store / "runs" / pipeline.latest_run()
    lines = [json.loads(line) for line in (run_dir / "metrics" / "numbers.jsonl").read_text().splitlines()]
    assert [line["chunk"] for line in lines] == [0, 1, 2, 3]
    offline_runs = list((run_dir / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert (run_dir / "logs" / "numbers.log").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["store.root=nosuch://bucket"], "cannot open store 'nosuch://bucket' (scheme 'nosuch')"),
        (["--until", "nosuch"], "unknown stage 'nosuch'"),
        (["numbers.chunkz=1"], "unknown config key 'numbers.chunkz'; did you mean 'numbers.chunks'?"),
        (
            ["--registry", "tests.parquet_stages:CYCLIC"],
            "the stage graph has a cycle: first -> second -> first",
        ),
        (["--registry", "no_such_module:STAGES"], "cannot import stage registry module 'no_such_module'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(pipeline, args, message):
    pipeline.capsys.readouterr()
    assert pipeline.run(*args) == 2
    err = pipeline.capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unwritable_store_root_fails_before_any_work(pipeline, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    assert pipeline.run(f"store.root={tmp_path / 'a-file' / 'store'}") == 2
    assert "is not writable" in pipeline.capsys.readouterr().err
    assert pipeline.executions() == []


def test_cli_subprocess_user_error_and_debug_traceback(tmp_path):
    base = [sys.executable, "-m", "gptline", "run", *TEST_DAG, "numbers.lrr=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run(base, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr == "gptline: error: unknown config key 'numbers.lrr'\n"
    debug = subprocess.run([*base, "--debug"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
