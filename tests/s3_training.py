"""The driver of the object-store training test (tests/test_cluster.py): the pretrain stage run as one Ray task on a
cluster whose nodes share no disk, against an S3 store, the way the runner runs it (inputs localized, work directory
opened, a NodeMirror handed to the stage, the artifact committed). A separate process: the test session already has a
Ray instance of its own.

    python -m tests.s3_training GCS_ADDRESS STORE_URI SCRATCH RESULT_JSON VERSION [KEY=VALUE ...]

SCRATCH is a path the cluster's worker node sees as a directory of its own (tests/cluster.py: private_dir), as
separate machines each have their own disk. The result: the stage's metrics, the files it committed, and the node of
the stage's task.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray

from pipeline.artifacts import Store
from pipeline.config import typed
from pipeline.dag import StageContext, StageResources
from stages import pretrain
from tests.test_pretrain import SMALL

INPUT_VERSIONS = {"tokenizer": "0" * 12, "tokenize": "1" * 12}


@ray.remote(num_cpus=0)
def build_pretrain(store_uri: str, scratch: str, version: str, overrides: dict) -> dict:
    store, scratch = Store(store_uri), Path(scratch)
    artifacts = {name: store.load(name, ver) for name, ver in INPUT_VERSIONS.items()}
    inputs = {name: store.localize(artifact, scratch) for name, artifact in artifacts.items()}
    workdir, _ = store.open_workdir("pretrain", version, scratch)
    mirror = store.mirror("pretrain", version, workdir, {inputs[name]: artifacts[name] for name in artifacts})
    ctx = StageContext("pretrain", resources=StageResources(num_workers=2), quiet=True, mirror=mirror)
    metrics = pretrain.run(typed(pretrain.PretrainConfig, {**SMALL, **overrides}), inputs, workdir, ctx)
    artifact = store.commit("pretrain", version, workdir, {"metrics": metrics})
    return {
        "metrics": metrics,
        "files": sorted(artifact.manifest["files"]),
        "node": ray.get_runtime_context().get_node_id(),
    }


def main() -> None:
    gcs_address, store_uri, scratch, result_path, version, *pairs = sys.argv[1:]
    overrides = {key: json.loads(value) for key, value in (pair.split("=", 1) for pair in pairs)}
    env_vars = {"PYTHONPATH": os.environ["PYTHONPATH"], "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    for name in ("GPTLINE_FAULT_DIR", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    ray.init(address=gcs_address, runtime_env={"env_vars": env_vars})
    result = ray.get(build_pretrain.remote(store_uri, scratch, version, overrides))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
