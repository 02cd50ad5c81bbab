"""Fields left out of the version: which they are, that each is proven not to change its stage's artifact, that
changing them plans reuse for every stage, and that a sweep over one builds its stage once."""

from __future__ import annotations

import json

from pipeline.artifacts import Store
from pipeline.config import compose_config
from pipeline.dag import DAG
from pipeline.versioning import split, unversioned_fields
from stages import REGISTRY
from tests import test_dpo, test_ppo, test_pretrain, test_sft_rm_stages
from tests.conftest import CONFIG_DIR

TRAINING = ["--registry", "tests.training_stage:REGISTRY", "--config-dir", CONFIG_DIR]


def versions(overrides: list[str]) -> dict[str, str]:
    config = compose_config(REGISTRY, overrides)
    return DAG(REGISTRY).versions({**{s.key: config[s.key] for s in REGISTRY}, "alignment": config["alignment"]})


def test_every_unversioned_field_is_proven_by_a_run_of_its_stage_both_ways():
    """Each marked field must appear in the changes its stage's identity test makes (test_*_unversioned_*)."""
    proven = {"pretrain": test_pretrain.UNVERSIONED_CHANGES, "sft": test_sft_rm_stages.SFT_CHANGES,
              "rm": test_sft_rm_stages.RM_CHANGES, "ppo": test_ppo.UNVERSIONED_CHANGES,
              "dpo": test_dpo.UNVERSIONED_CHANGES}  # fmt: skip
    marked = {s.name: set(unversioned_fields(s.config_class)) for s in REGISTRY}
    assert {stage: fields for stage, fields in marked.items() if fields} == {s: set(c) for s, c in proven.items()}


def test_measuring_fields_change_no_version_and_the_rest_still_do():
    base = versions([])
    assert versions(["pretrain.eval_every=50", "pretrain.sample_prompts=[Hi]", "sft.num_samples=1",
                     "rm.keep_checkpoints=5", "ppo.checkpoint_every=1"]) == base  # fmt: skip
    changed = versions(["pretrain.checkpoint_every=50"])  # the loss guard rolls back to the last checkpoint
    assert {s for s in base if base[s] != changed[s]} == {"pretrain", "sft", "rm", "ppo", "evaluate"}
    changed = versions(["ppo.seed=1"])
    assert {s for s in base if base[s] != changed[s]} == {"ppo", "evaluate"}


def test_split_keeps_nested_and_mapped_dataclasses_apart():
    from stages.pretrain import PretrainConfig

    kept, left = split(PretrainConfig, {"steps": 3, "eval_every": 7, "optim": {"lr": 0.1}, "model": {"dim": 8}})
    assert kept == {"steps": 3, "optim": {"lr": 0.1}, "model": {"dim": 8}} and left == {"eval_every": 7}


def test_a_sweep_over_an_unversioned_field_trains_once_and_a_dry_run_then_plans_reuse(tmp_path, ray_session, capsys):
    from gptline.cli.main import main

    store = tmp_path / "store"
    common = [
        f"store.root={store}",
        "tracking=disabled",
        "run.quiet=true",
        "cluster.resources.fit_numbers.num_workers=1",
    ]
    assert main(["run", *TRAINING, *common, "-m", "fit_numbers.eval_every=2,3"]) == 0
    runs = sorted(p.name for p in (store / "runs").iterdir())
    states = [json.loads((store / "runs" / r / "nodes" / "fit_numbers.json").read_text())["state"] for r in runs]
    assert states == ["done", "reused"]  # run ids sort by start time: the first point trains
    [artifact] = Store(str(store)).list("fit_numbers")
    assert artifact.manifest["unversioned"]["eval_every"] == 2
    assert artifact.manifest["unversioned"]["keep_checkpoints"] == 2
    capsys.readouterr()
    assert main(["diff", *runs, "--store", str(store)]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fit_numbers.eval_every")]
    assert row.split()[1:3] == ["2", "3"] and row.endswith("unversioned: rebuilt nothing")
    assert main(["run", *TRAINING, *common, "fit_numbers.eval_every=1", "fit_numbers.keep_checkpoints=5",
                 "--dry-run"]) == 0  # fmt: skip
    plan = capsys.readouterr().out
    assert [line.split()[-1] for line in plan.splitlines()[-2:]] == ["reuse", "reuse"]


def test_a_subclass_giving_an_unversioned_field_another_default_keeps_it_unversioned():
    from tests.training_stage import FitNumbersConfig

    assert split(FitNumbersConfig, {"eval_every": 3, "steps": 6}) == ({"steps": 6}, {"eval_every": 3})
