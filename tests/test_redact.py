"""The one redaction: secret keys at any depth, env_vars, URI credentials and ${oc.env:...} values, in configs,
manifests, run records and text; and a redacted value comes back only from the config composed now."""

from __future__ import annotations

import json

import pytest

from pipeline import redact
from pipeline.artifacts import Store
from pipeline.config import compose_config
from pipeline.dag import load_registry
from pipeline.errors import ConfigError
from tests.conftest import CONFIG_DIR, REGISTRY

URI = "s3://AKIAPLANTED:uri-secret-5b1d@bucket/store?endpoint_override=127.0.0.1:1&region=us-east-1&scheme=http"


def test_secret_keys_at_any_depth_env_vars_and_uri_credentials_are_redacted():
    config = {
        "service": {"nested": [{"WANDB_API_KEY": "k-3f1a", "hfToken": "t-8c2e", "tokens": 512}]},
        "tokenizer": {"max_tokens": 7, "keys": ["a"]},
        "runtime_env": {"env_vars": {"PLAIN_NAME": "v-a9d0"}, "pip": ["x"]},
        "db": {"credentials": {"user": "u-11", "password": "p-22"}},
        "store": URI,
        "flag": {"secret_enabled": True},
    }
    out = redact.redact_config(config)
    assert out["service"]["nested"][0] == {"WANDB_API_KEY": "<redacted>", "hfToken": "<redacted>", "tokens": 512}
    assert out["tokenizer"] == config["tokenizer"] and out["runtime_env"]["pip"] == ["x"]
    assert out["runtime_env"]["env_vars"] == {"PLAIN_NAME": "<redacted>"}
    assert out["db"]["credentials"] == {"user": "<redacted>", "password": "<redacted>"}
    assert "AKIAPLANTED" not in out["store"] and "uri-secret-5b1d" not in out["store"]
    assert out["store"].startswith("s3://<redacted>@bucket/store?endpoint_override=127.0.0.1:1")
    assert out["flag"] == {"secret_enabled": True}
    assert redact.redact_text("s3://b/x?access_key=AK1&secret_key=SK2&region=r") == (
        "s3://b/x?access_key=<redacted>&secret_key=<redacted>&region=r"
    )


def test_a_store_uri_with_credentials_is_never_shown_nor_written(tmp_path):
    assert "uri-secret-5b1d" not in Store(URI).uri and "AKIAPLANTED" not in Store(URI).uri
    local = Store(str(tmp_path / "store"))
    redact.remember_config({"store": {"root": URI}}, {"store": {"root": URI}})
    work, _ = local.open_workdir("stage", "0" * 12, tmp_path)
    (work / "out.txt").write_text("x")
    local.commit("stage", "0" * 12, work, {"note": f"no {URI}", "detail": "bad key AKIAPLANTED"})
    manifest = (tmp_path / "store" / "stage" / ("0" * 12) / "manifest.json").read_text()
    assert "uri-secret-5b1d" not in manifest and "AKIAPLANTED" not in manifest


def test_oc_env_values_are_kept_as_references_and_resolved_again(monkeypatch):
    monkeypatch.setenv("PLANTED_PASSWORD", "oc-secret-0d7e")
    specs = load_registry(REGISTRY)
    config = compose_config(specs, ["+cluster.runtime_env={env_vars:{P:'${oc.env:PLANTED_PASSWORD}'}}"], CONFIG_DIR)
    assert config["cluster"]["runtime_env"]["env_vars"]["P"] == "oc-secret-0d7e"
    record = json.loads(json.dumps(redact.redact_config(config)))
    assert record["cluster"]["runtime_env"]["env_vars"]["P"] == "${oc.env:PLANTED_PASSWORD}"
    assert "oc-secret-0d7e" not in json.dumps(record)
    assert redact.redact_text("got oc-secret-0d7e") == "got ${oc.env:PLANTED_PASSWORD}"


def test_a_redacted_value_comes_from_the_config_composed_now_or_is_an_error_naming_its_key():
    recorded = {"a": {"api_key": "<redacted>", "n": 1}, "b": ["<redacted>"]}
    local = {"a": {"api_key": "live-key", "n": 2}, "b": ["live"]}
    assert redact.restore_redacted(recorded, local) == {"a": {"api_key": "live-key", "n": 1}, "b": ["live"]}
    with pytest.raises(ConfigError, match=r"'a\.api_key'"):
        redact.restore_redacted(recorded, {"b": ["live"]})
