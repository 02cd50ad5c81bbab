"""`gptline tune`: Optuna trials are ordinary runs that reuse what they share; a bad spec names its key."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.tune import load_spec
from tests.conftest import TEST_DAG


def write(path, text):
    path.write_text(text)
    return str(path)


def test_trials_reuse_shared_stages_and_the_best_trial_is_reported(pipeline, tmp_path):
    spec = write(tmp_path / "spec.yaml", "objective: total.total\ndirection: maximize\ntrials: 4\nparams:\n"
                 "  total.scale: {type: float, low: 0.5, high: 2.0}\n")  # fmt: skip
    assert pipeline.cli_plain("tune", spec, *TEST_DAG) == 0
    out = pipeline.capsys.readouterr().out
    assert sorted(pipeline.executions()) == sorted(["numbers", "squares", "evens"] + ["total"] * 4)
    table = out[out.index("trial  params") :].splitlines()[2:6]
    totals = [float(row.split()[2]) for row in table]
    best = out.splitlines()[-1]
    assert best.startswith("best: trial ") and f"total.total={max(totals):.4g}" in best


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("objective: total\nparams: {a.b: {low: 0, high: 1}}\n", "objective"),
        ("objective: total.total\ntrials: 0\nparams: {a.b: {low: 0, high: 1}}\n", "trials"),
        ("objective: total.total\nparams: {a.b: {low: 1, high: 0}}\n", "params.a.b.low"),
        ("objective: total.total\nparams: {a.b: {type: normal, low: 0, high: 1}}\n", "params.a.b.type"),
        ("objective: total.total\nparams: {a.b: {low: 0, high: 1, log: true}}\n", "params.a.b.low"),
    ],
)
def test_a_bad_spec_names_the_key(tmp_path, text, key):
    write(tmp_path / "spec.yaml", text)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_spec(tmp_path / "spec.yaml")


def test_an_unknown_spec_key_is_an_error(tmp_path):
    write(tmp_path / "s.yaml", "objective: a.b\ntrails: 3\n")
    with pytest.raises(ConfigError, match="trails"):
        load_spec(tmp_path / "s.yaml")
