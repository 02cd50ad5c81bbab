"""A training stage killed at any point after its last step, or between two checkpoints, recovers exactly: through the
real runner (tests/training_stage.py: numbers ─► fit_numbers on a two-worker group), each kill at a fault point.

- After the final checkpoint (its save, consolidation, export): Ray Train restarts the group, which restores the
  last step and goes straight to the end: nothing is trained again, the weights are the uninterrupted run's.
- Between outputs and manifest: the checkpoints are still in the partial directory, so the retried task does not
  train again either; they are gone once the artifact is in place, and never part of it.
- Between commit and cleanup: the retry finds the artifact committed, and its leftover transient files go.
- Between checkpoints: the resumed run repeats the steps after the last checkpoint, and the log shows each step once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.artifacts import TRANSIENT, Store
from tests.conftest import CONFIG_DIR

REGISTRY = ["--registry", "tests.training_stage:REGISTRY", "--config-dir", CONFIG_DIR]
pytestmark = pytest.mark.slow


def run(store: Path, *overrides: str) -> int:
    from gptline.cli.main import main

    return main(["run", *REGISTRY, f"store.root={store}", "tracking=disabled", "run.quiet=true", *overrides])


def artifact(store: Path) -> Path:
    [found] = Store(str(store)).list("fit_numbers")
    return Path(found.path)


def steps_logged(directory: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (directory / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, ray_session) -> Path:
    store = tmp_path_factory.mktemp("straight") / "store"
    assert run(store) == 0
    return artifact(store)


def assert_recovered(straight: Path, recovered: Path, restored_step: int) -> None:
    final = json.loads((recovered / "final.json").read_text())
    assert final["restored_step"] == restored_step
    assert steps_logged(recovered) == [1, 2, 3, 4, 5, 6]
    ours, theirs = load_file(str(recovered / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert all(ours[k].equal(theirs[k]) for k in theirs)
    assert not (recovered / TRANSIENT).exists()
    manifest = json.loads((recovered / "manifest.json").read_text())
    assert not any(name.startswith(TRANSIENT) for name in manifest["files"])


@pytest.mark.parametrize("fault", ["after_checkpoint_6", "before_consolidation", "before_export"])
def test_a_kill_after_the_final_checkpoint_finishes_without_training_again(straight, pipeline, fault):
    pipeline.arm(f"fit_numbers.{fault}")
    assert run(pipeline.store) == 0
    assert not (pipeline.ray.fault_dir / f"fit_numbers.{fault}").exists()  # the fault fired
    assert_recovered(straight, artifact(pipeline.store), restored_step=6)


def test_a_kill_after_the_final_checkpoint_under_zero3_consolidates_from_the_checkpoint(pipeline, tmp_path):
    reference = tmp_path / "reference"
    assert run(reference, "fit_numbers.deepspeed.zero_stage=3") == 0
    pipeline.arm("fit_numbers.before_consolidation")
    assert run(pipeline.store, "fit_numbers.deepspeed.zero_stage=3") == 0
    assert_recovered(artifact(reference), artifact(pipeline.store), restored_step=6)


def test_a_kill_before_the_manifest_keeps_the_checkpoints_and_the_retry_does_not_train_again(straight, pipeline):
    pipeline.arm("commit.fit_numbers.before_manifest")
    assert run(pipeline.store) == 0  # Ray retries the stage's task, which resumes from its partial directory
    assert not (pipeline.ray.fault_dir / "commit.fit_numbers.before_manifest").exists()
    assert_recovered(straight, artifact(pipeline.store), restored_step=6)
    assert not list(pipeline.store.glob("fit_numbers/*.partial"))


def test_a_kill_between_commit_and_cleanup_leaves_the_artifact_clean(straight, pipeline):
    pipeline.arm("commit.fit_numbers.before_cleanup")
    assert run(pipeline.store) == 0  # the retry finds the artifact committed: reused, its transient files dropped
    assert not (pipeline.ray.fault_dir / "commit.fit_numbers.before_cleanup").exists()
    assert_recovered(straight, artifact(pipeline.store), restored_step=0)
    assert pipeline.cli("show", f"fit_numbers/{artifact(pipeline.store).name}", "--verify") == 0


def test_a_kill_between_checkpoints_repeats_the_lost_steps_and_logs_each_once(straight, pipeline):
    pipeline.arm("fit_numbers.after_step_5")  # the last checkpoint was at step 3
    assert run(pipeline.store) == 0
    assert not (pipeline.ray.fault_dir / "fit_numbers.after_step_5").exists()
    assert_recovered(straight, artifact(pipeline.store), restored_step=3)
