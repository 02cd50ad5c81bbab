"""Config fuzzing: every numeric and boolean key of the default config, given a value of the wrong type, and every
enumerated string key, given a value outside its choices, fails with an error naming that key before any work
starts: through Hydra composition on the command line (a sample of keys: each composition takes ~0.3 s) and through
the check every run record's config passes (`load_config`, used by resume), for every key."""

from __future__ import annotations

import copy

import pytest
from omegaconf import OmegaConf

from gptline.cli.main import set_config_value
from pipeline.config import DEFAULT_CONFIG_DIR, compose_config, load_config
from pipeline.dag import load_registry
from pipeline.errors import ConfigError

SPECS = load_registry("stages:REGISTRY")
DEFAULT = compose_config(SPECS, [], DEFAULT_CONFIG_DIR)


def leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif not isinstance(node, list):
        yield prefix[:-1], node


TYPED = [(key, value) for key, value in leaves(DEFAULT) if isinstance(value, bool | int | float)]
ENUMERATED = ["tracking.mode", "store.verify", "tokenizer.model_type", "ppo.placement", "ppo.kl.estimator",
              "data.extractor"]  # fmt: skip


def test_the_default_config_has_many_typed_keys():
    assert len(TYPED) > 150  # the walk really covers the tree


def wrong(value):
    return "maybe" if isinstance(value, bool) else "not-a-number"


@pytest.mark.slow  # ~0.12 s per key, ~280 keys
def test_a_wrong_type_names_the_key_for_every_key():
    for key, value in TYPED:
        tree = copy.deepcopy(DEFAULT)
        set_config_value(tree, key, wrong(value))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(SPECS, tree)


@pytest.mark.parametrize(("key", "value"), TYPED[:: max(1, len(TYPED) // 12)], ids=lambda v: str(v))
def test_a_wrong_type_on_the_command_line_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(SPECS, [f"{key}={wrong(value)}"], DEFAULT_CONFIG_DIR)


@pytest.mark.parametrize("key", ENUMERATED)
def test_a_value_outside_the_choices_names_the_key(key):
    assert isinstance(OmegaConf.select(OmegaConf.create(DEFAULT), key), str), key
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(SPECS, [f"{key}=no-such-choice"], DEFAULT_CONFIG_DIR)
