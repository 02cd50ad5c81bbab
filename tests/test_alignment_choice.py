"""The alignment choice on the recipe's DAG, without Ray: `alignment` picks ppo (the default), dpo or several; a run
builds only the chosen ones, evaluate takes each under its own name, and a sweep over a DPO knob shares every
artifact upstream of dpo."""

from __future__ import annotations

import pytest

from pipeline.config import compose_config
from pipeline.dag import DAG, load_registry
from pipeline.errors import ConfigError

SPECS = load_registry("stages:REGISTRY")
DAG_ = DAG(SPECS)
ALIGNED = {"ppo", "dpo"}


@pytest.mark.parametrize(("override", "chosen"), [([], {"ppo"}), (["alignment=dpo"], {"dpo"}),
                                                   (["alignment=[ppo,dpo]"], {"ppo", "dpo"}),
                                                   (["alignment=[]"], set())])  # fmt: skip
def test_alignment_picks_the_stages_built_and_evaluated(override, chosen):
    config = compose_config(SPECS, override)
    selected = set(DAG_.select(config=config))
    assert selected & ALIGNED == chosen and {"sft", "rm", "evaluate"} <= selected  # the judge is always built
    slots = DAG_.specs["evaluate"].slots(config)
    assert {slot for slot in slots if slot in ALIGNED} == chosen and all(slots[s] == s for s in chosen)
    assert DAG_.specs["dpo"].slots(config) == {"sft": "sft", "fetch": "fetch"}  # dpo never needs rm


@pytest.mark.parametrize(("override", "message"), [
    ("alignment=rlhf", "'alignment': unknown choice 'rlhf'; choose from ppo, dpo, grpo"),
    ("alignment=[dpo,3]", "'alignment': must be one of ppo, dpo, grpo or a list of them"),
])  # fmt: skip
def test_an_unknown_alignment_is_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(SPECS, [override])


def test_a_sweep_over_a_dpo_knob_plans_to_reuse_everything_upstream(tmp_path, capsys):
    from gptline.cli.main import main

    store = f"store.root={tmp_path / 'store'}"
    assert main(["run", "-m", "--dry-run", store, "alignment=dpo", "dpo.loss.beta=0.1,0.5"]) == 0
    plans = capsys.readouterr().out.split("== sweep point ")[1:]
    versions = [dict(line.split()[:2] for line in plan.splitlines()[4:] if line.strip()) for plan in plans]
    assert len(versions) == 2 and versions[0].keys() == versions[1].keys()
    differ = {stage for stage in versions[0] if versions[0][stage] != versions[1][stage]}
    assert differ == {"dpo", "evaluate"} and "ppo" not in versions[0]
