"""Progress reporting: lines in logs, a tqdm bar in a terminal, nothing when quiet; bar state never reaches logs."""

from __future__ import annotations

import io
import json

from pipeline.progress import BAR_STATE_TAG, Progress, default_mode
from pipeline.runner import _Tee


def test_lines_mode_prints_at_most_every_interval_and_always_the_end(capsys):
    bar = Progress("lines", every_s=3600)(5, "[stage] work")
    for i in range(5):
        bar.update(1, loss=1.0 / (i + 1), step_name="x")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[stage] work 5/5 loss 0.2 step_name x"]
    every = Progress("lines")(3, "[ppo] iterations", every_s=0)
    for _ in range(3):
        every.update(1, kl=0.5)
    assert capsys.readouterr().out.splitlines() == [f"[ppo] iterations {i}/3 kl 0.5" for i in (1, 2, 3)]


def test_quiet_mode_prints_nothing_and_bar_mode_draws_tqdm(capsys):
    with Progress("quiet")(3, "silent") as bar:
        bar.update(3, loss=1.0)
    assert capsys.readouterr() == ("", "")
    with Progress("bar")(4, "[pretrain] training", unit="step") as bar:
        bar.update(4, loss=2.5)
    err = capsys.readouterr().err
    assert "[pretrain] training loss 2.5" in err and "4/4" in err


def test_quiet_config_and_non_terminal_output_choose_the_mode():
    assert default_mode(quiet=True) == "quiet"
    assert default_mode(quiet=False) == "lines"  # pytest's stdout is not a terminal


def test_the_stage_log_keeps_prints_but_not_bar_state():
    screen, log = io.StringIO(), io.StringIO()
    tee = _Tee(screen, log)
    tee.write("[tokenize] 3/4\n")
    tee.write(json.dumps({"__magic_token__": BAR_STATE_TAG, "x": 3}) + "\n")
    assert log.getvalue() == "[tokenize] 3/4\n"
    assert BAR_STATE_TAG in screen.getvalue()
