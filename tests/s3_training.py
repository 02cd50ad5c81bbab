"""The driver of the object-store training tests (tests/test_cluster.py): the pretrain stage run as one Ray task on
the cluster's head node, against an S3 store, the way the runner runs it (inputs localized, work directory opened,
a NodeMirror handed to the stage, SIGTERM turned into a stop request, the artifact committed). A separate process:
the test session already has a Ray instance of its own.

    python -m tests.s3_training GCS_ADDRESS STORE_URI SCRATCH RESULT_JSON VERSION [--workers N] [KEY=JSON ...]

SCRATCH is a path the cluster's worker node sees as a directory of its own (tests/cluster.py: private_dir), as
separate machines each have their own disk. The stage's task writes its pid to RESULT_JSON.pid (for SIGTERM), and
the result: the stage's metrics and the files it committed, or the error it ended with.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.artifacts import Store
from pipeline.config import typed
from pipeline.dag import StageContext, StageResources, stop_on_sigterm
from pipeline.errors import GptlineError
from stages import pretrain
from tests.test_pretrain import SMALL

INPUT_VERSIONS = {"tokenizer": "0" * 12, "tokenize": "1" * 12}


@ray.remote(num_cpus=0)
def build_pretrain(store_uri: str, scratch: str, version: str, workers: int, overrides: dict, pid_file: str) -> dict:
    Path(pid_file).write_text(str(os.getpid()))
    store, scratch = Store(store_uri), Path(scratch)
    artifacts = {name: store.load(name, ver) for name, ver in INPUT_VERSIONS.items()}
    inputs = {name: store.localize(artifact, scratch) for name, artifact in artifacts.items()}
    workdir, resumed = store.open_workdir("pretrain", version, scratch)
    mirror = store.mirror("pretrain", version, workdir, {inputs[name]: artifacts[name] for name in artifacts})
    ctx = StageContext("pretrain", resources=StageResources(num_workers=workers), quiet=True, mirror=mirror)
    try:
        with stop_on_sigterm(workdir, "pretrain", mirror):
            metrics = pretrain.run(typed(pretrain.PretrainConfig, {**SMALL, **overrides}), inputs, workdir, ctx)
    except GptlineError as e:
        store.save_partial("pretrain", version, workdir)
        return {"error": str(e), "resumed": resumed}
    artifact = store.commit("pretrain", version, workdir, {"metrics": metrics})
    return {"metrics": metrics, "files": sorted(artifact.manifest["files"]), "resumed": resumed}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("gcs_address", "store_uri", "scratch", "result", "version"):
        parser.add_argument(name)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="KEY=JSON pretrain config overrides")
    args = parser.parse_intermixed_args()
    overrides = {key: json.loads(value) for key, value in (pair.split("=", 1) for pair in args.overrides)}
    env_vars = {"PYTHONPATH": os.environ["PYTHONPATH"], "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    for name in ("GPTLINE_FAULT_DIR", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    ray.init(address=args.gcs_address, runtime_env={"env_vars": env_vars})
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = build_pretrain.options(scheduling_strategy=head)
    result = ray.get(task.remote(args.store_uri, args.scratch, args.version, args.workers, overrides,
                                 args.result + ".pid"))  # fmt: skip
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
