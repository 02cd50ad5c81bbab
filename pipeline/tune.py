"""`gptline tune SPEC.yaml`: search config knobs with Optuna, one pipeline run per trial.

A spec names the objective (`STAGE.METRIC`, a metric the stage returns, e.g. `evaluate.win_ppo_vs_sft`), its
direction, the number of trials, and a search space over config keys:

    objective: evaluate.win_ppo_vs_sft
    direction: maximize
    trials: 8
    params:
      ppo.kl.coef: {type: float, low: 0.01, high: 0.5, log: true}
      ppo.ppo_epochs: {type: int, low: 1, high: 4}
      ppo.sampling.temperature: {type: categorical, choices: [0.7, 1.0]}

Each trial is an ordinary run with the trial's values as overrides, so everything the trials share (pretrain, sft
and rm for a PPO search) is built once and reused, and every trial is a run record with a report. The sampler is
Optuna's TPE, seeded. Why not Hydra's Optuna sweeper: its last release (hydra-optuna-sweeper 1.3.0) requires
optuna < 3 and plugs into `@hydra.main` applications, while gptline composes each run's config itself; driving
Optuna's ask/tell API directly keeps the current Optuna and the same override syntax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import typed, validate
from pipeline.errors import ConfigError, GptlineError

PARAM_TYPES = ("float", "int", "categorical")
DIRECTIONS = ("maximize", "minimize")


@dataclass
class ParamSpec:
    type: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] = field(default_factory=list)

    def validate(self) -> list[tuple[str, str]]:
        if self.type not in PARAM_TYPES:
            return [("type", f"must be one of {', '.join(PARAM_TYPES)}, got {self.type!r}")]
        if self.type == "categorical":
            return [] if self.choices else [("choices", "a categorical parameter needs at least one choice")]
        if self.low is None or self.high is None or not self.low < self.high:
            return [("low", f"needs low < high, got low={self.low} high={self.high}")]
        if self.log and self.low <= 0:
            return [("low", f"a log-scale range must be positive, got {self.low}")]
        return []


@dataclass
class TuneSpec:
    objective: str = ""  # STAGE.METRIC
    direction: str = "maximize"
    trials: int = 8
    seed: int = 0
    params: dict[str, ParamSpec] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # fixed for every trial

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.objective.count(".") != 1:
            problems.append(("objective", f"must be STAGE.METRIC, got {self.objective!r}"))
        if self.direction not in DIRECTIONS:
            problems.append(("direction", f"must be maximize or minimize, got {self.direction!r}"))
        if self.trials < 1:
            problems.append(("trials", f"must be >= 1, got {self.trials}"))
        if not self.params:
            problems.append(("params", "name at least one config key to search"))
        for key, param in self.params.items():
            problems += [(f"params.{key}.{k}", v) for k, v in param.validate()]
        return problems


def load_spec(path: Path) -> TuneSpec:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from e
    try:
        spec = typed(TuneSpec, raw)
    except Exception as e:  # an unknown key or a wrong type, named by OmegaConf
        raise ConfigError(f"{path}: {e}") from e
    try:
        validate(spec)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return spec


def suggest(trial, key: str, param: ParamSpec) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(key, param.choices)
    if param.type == "int":
        return trial.suggest_int(key, int(param.low), int(param.high), log=param.log)
    return trial.suggest_float(key, param.low, param.high, log=param.log)


def tune(spec: TuneSpec, run: Callable[[list[str]], tuple[str, dict[str, Any] | None]]) -> list[dict[str, Any]]:
    """Run the trials; `run(overrides) -> (run_id, the objective stage's metrics or None when the run failed)`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stage, metric = spec.objective.split(".")
    study = optuna.create_study(direction=spec.direction, sampler=optuna.samplers.TPESampler(seed=spec.seed))
    results = []
    for number in range(spec.trials):
        trial = study.ask()
        values = {key: suggest(trial, key, param) for key, param in spec.params.items()}
        run_id, metrics = run([*spec.overrides, *(f"{k}={v}" for k, v in values.items())])
        value = None if metrics is None else metrics.get(metric)
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if metrics is not None:
                raise GptlineError(f"objective {spec.objective}: stage {stage} returned no metric {metric!r} "
                                   f"(it has: {', '.join(sorted(metrics))})")  # fmt: skip
        else:
            study.tell(trial, float(value))
        results.append({"trial": number, "params": values, "value": value, "run": run_id})
    return results
