"""The stage graph and config composition, without Ray: identity of versions, selection, and config errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import compose_config, load_config
from pipeline.dag import DAG, StageSpec
from pipeline.errors import ConfigError, DagError
from tests.conftest import CONFIG_DIR
from tests.parquet_stages import CYCLIC, REGISTRY, NumbersConfig, numbers


def compose(overrides: list[str], specs: list[StageSpec] = REGISTRY) -> dict:
    return compose_config(specs, overrides, Path(CONFIG_DIR))


def versions(overrides: list[str], specs: list[StageSpec] = REGISTRY) -> dict[str, str]:
    config = compose(overrides, specs)
    return DAG(specs).versions({s.key: config[s.key] for s in specs})


def test_version_changes_exactly_with_own_config_version_or_upstream():
    base = versions([])
    # Own config subtree: squares and everything downstream of it change, nothing else.
    changed = versions(["squares.power=3"])
    assert {s for s in base if base[s] != changed[s]} == {"squares", "total"}
    # Upstream change propagates to every descendant.
    changed = versions(["numbers.seed=7"])
    assert {s for s in base if base[s] != changed[s]} == {"numbers", "squares", "evens", "total"}
    # Leaf change touches only the leaf.
    changed = versions(["total.scale=2.0"])
    assert {s for s in base if base[s] != changed[s]} == {"total"}
    # Resources, retries, store, tracking and cluster never enter an artifact's identity.
    assert versions(["cluster.resources.numbers.num_workers=8", "cluster.resources.squares.num_cpus=2"]) == base
    assert versions(["run.max_retries=5", "tracking=online", "cluster=remote", "store.verify=size"]) == base
    # Bumping a stage's VERSION changes it and its descendants.
    bumped = [dataclasses.replace(s, version=2) if s.name == "evens" else s for s in REGISTRY]
    changed = versions([], bumped)
    assert {s for s in base if base[s] != changed[s]} == {"evens", "total"}


def test_topological_order_and_selection():
    dag = DAG(REGISTRY)
    assert dag.order == ["numbers", "squares", "evens", "total"]
    assert dag.select() == dag.order
    assert dag.select(until=["squares"]) == ["numbers", "squares"]
    assert dag.select(until=["evens", "squares"]) == ["numbers", "squares", "evens"]
    assert dag.select(only=["total", "evens"]) == ["evens", "total"]
    with pytest.raises(DagError, match="unknown stage 'nosuch'; known stages: numbers, squares"):
        dag.select(until=["nosuch"])
    with pytest.raises(DagError, match="either --until or --only"):
        dag.select(until=["total"], only=["evens"])


def test_malformed_graphs_are_rejected():
    with pytest.raises(DagError, match="cycle: first -> second -> first"):
        DAG(CYCLIC)
    with pytest.raises(DagError, match="takes input 'missing'"):
        DAG([StageSpec("a", numbers, NumbersConfig, inputs=("missing",))])
    with pytest.raises(DagError, match="registered twice"):
        DAG([StageSpec("a", numbers, NumbersConfig), StageSpec("a", numbers, NumbersConfig)])
    with pytest.raises(DagError, match="invalid stage name"):
        DAG([StageSpec("../up", numbers, NumbersConfig)])
    with pytest.raises(DagError, match="invalid stage name"):
        DAG([StageSpec("runs", numbers, NumbersConfig)])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("numbers.chunkz=3", "unknown config key 'numbers.chunkz'; did you mean 'numbers.chunks'?"),
        ("+numbers.chunkz=3", "unknown config key 'numbers.chunkz'; did you mean 'numbers.chunks'?"),
        ("run.max_retriez=3", "unknown config key 'run.max_retriez'; did you mean 'run.max_retries'?"),
        ("numbers.chunks=many", "invalid value for config key 'numbers.chunks'"),
        ("numbers.chunks=0", "invalid value for config key 'numbers.chunks': must be >= 1, got 0"),
        ("run.max_retries=-1", "invalid value for config key 'run.max_retries': must be >= 0"),
        (
            "store.verify=maybe",
            "invalid value for config key 'store.verify': must be one of none, size, full",
        ),
        ("tracking.mode=cloud", "invalid value for config key 'tracking.mode'"),
        ("cluster.resources.squares.num_workers=0", "'cluster.resources.squares.num_workers': must be >= 1"),
        ("cluster=nosuch", "Could not find 'cluster/nosuch' Available options in 'cluster': local remote"),
        ("numbers.chunks=[1", "numbers.chunks=[1"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        compose([override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_recorded_config_is_revalidated_on_load():
    config = compose(["numbers.chunks=2"])
    assert load_config(REGISTRY, config) == config
    config["numbers"]["chunkz"] = 3
    with pytest.raises(ConfigError, match="'numbers.chunkz'; did you mean 'numbers.chunks'"):
        load_config(REGISTRY, config)


def test_overrides_after_only_are_overrides_not_stage_names():
    from gptline.cli.main import parse_args

    args = parse_args(["run", "--only", "ppo", "ppo.iterations=3", "--until", "rm", "sft.epochs=1"])
    assert args.only == ["ppo"] and args.until == ["rm"]
    assert args.overrides == ["ppo.iterations=3", "sft.epochs=1"]


def test_a_mapping_of_dataclasses_takes_new_entries_checked_like_any_key():
    from stages import REGISTRY as RECIPE

    def sources(*overrides: str) -> dict:
        return compose_config(RECIPE, ["fetch=none", *overrides])["data"]["sources"]

    added = sources("+data.sources.mine.type=warc", "+data.sources.mine.paths=[/x.warc.gz]", "~data.sources.web")
    assert "web" not in added and added["mine"]["type"] == "warc" and added["mine"]["weight"] == 1.0
    assert sources("+data.sources.mine={type: warc, paths: [/x.warc.gz]}")["mine"] == added["mine"]
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.sources.mine.typ'; did you mean 'data.sources.mine.type'"
    ):
        sources("+data.sources.mine.typ=warc")
    with pytest.raises(ConfigError, match=r"'data.sources.wbe'; did you mean 'data.sources.web'\? To add an entry"):
        sources("data.sources.wbe.weight=1")
    with pytest.raises(ConfigError, match=r"invalid value for config key 'data.sources.mine.weight'"):
        sources("+data.sources.mine={weight: heavy}")
    resources = compose_config(RECIPE, ["+cluster.resources.extra.num_workers=3"])["cluster"]["resources"]
    assert resources["extra"]["num_workers"] == 3 and resources["pretrain"]["num_workers"] == 2
