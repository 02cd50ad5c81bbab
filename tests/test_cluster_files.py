"""The cluster files are what they claim: valid YAML of the right kind, token auth on and the dashboard internal
in every one (localhost, or a ClusterIP service for the RayJob), a Slurm script bash accepts, and the `remote`
cluster config composing with per-stage resources."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from pipeline.config import DEFAULT_CONFIG_DIR, compose_config
from pipeline.dag import load_registry

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def test_ray_up_config_has_gpu_workers_token_auth_and_a_local_dashboard():
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(config)
    assert config["head_node_type"] in config["available_node_types"]
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)


def test_kuberay_manifests_use_token_auth_and_keep_the_dashboard_internal():
    """The RayCluster's dashboard is reached by port-forward (localhost in the pod); the RayJob's by KubeRay's
    submitter through the head service (all the pod's interfaces), a ClusterIP service with token auth on."""
    cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    for spec, host in ((cluster["spec"], "127.0.0.1"), (job["spec"]["rayClusterSpec"], "0.0.0.0")):
        assert spec["authOptions"]["mode"] == "token" and spec["rayVersion"] == "2.60.0"
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == host
    assert "python -m gptline run cluster=remote" in job["spec"]["entrypoint"]


def test_slurm_script_parses_and_starts_an_authenticated_cluster():
    script = (CLUSTER / "slurm.sbatch").read_text()
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm.sbatch")], check=True)
    assert "export RAY_AUTH_MODE=token" in script and "--dashboard-host=127.0.0.1" in script
    assert "gptline submit" in script


def test_remote_cluster_config_composes_with_gpu_resources_per_stage():
    config = compose_config(load_registry("stages:REGISTRY"), ["cluster=remote"], DEFAULT_CONFIG_DIR)
    resources = config["cluster"]["resources"]
    assert resources["pretrain"]["gpus_per_worker"] == 1 and resources["pretrain"]["num_workers"] == 16
    assert resources["evaluate"]["num_gpus"] == 1
    assert ".venv" in config["cluster"]["runtime_env"]["excludes"]


def run_as_job_entrypoint(entrypoint: str) -> tuple[int, str, str]:
    """As Ray's job supervisor runs an entrypoint: a shell started by a Ray worker, Ray's internal variables
    removed; here with a PATH whose first `python` is not the cluster's."""
    out = subprocess.run(["sh", "-c", entrypoint], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    return out.returncode, out.stdout, out.stderr


def test_a_submitted_job_runs_under_the_python_of_the_clusters_ray(ray_session):
    import sys

    import ray

    from gptline.cli.main import job_entrypoint

    entrypoint = job_entrypoint(["-c", "import sys, ray; print(sys.prefix)"])
    code, out, err = ray.get(ray.remote(run_as_job_entrypoint).remote(entrypoint))
    assert code == 0, err[-2000:]
    assert out.strip() == sys.prefix
