"""Security: checkpoints load with weights_only (a pickle payload in a checkpoint never runs), our code never calls
torch.load otherwise or unpickles data; secrets in the environment never reach manifests, run configs or logs;
names from config and archives cannot escape the store or the artifact."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import DEFAULT_CONFIG_DIR, compose_config
from pipeline.dag import load_registry
from pipeline.errors import ConfigError, GptlineError
from stages import fetch
from tests.conftest import CONFIG_DIR, REGISTRY, ROOT

EVIL = """
import os, sys, torch
from gptline.training.engine import weights_only_loads

class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[1],))

torch.save({"module": {}, "client": Payload()}, sys.argv[2])
weights_only_loads()
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
try:
    TorchCheckpointEngine().load(sys.argv[2])  # DeepSpeed passes weights_only=False here
except Exception as e:
    print("refused:", type(e).__name__)
"""


def test_a_pickle_payload_in_a_checkpoint_never_runs(tmp_path):
    marker, checkpoint = tmp_path / "pwned", tmp_path / "mp_rank_00_model_states.pt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", EVIL, str(marker), str(checkpoint)], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert "refused: UnpicklingError" in out.stdout, out.stdout + out.stderr
    assert not marker.exists()


def test_our_code_never_unpickles():
    sources = [p for d in ("gptline", "pipeline", "stages", "bench") for p in (ROOT / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "pickle.load" not in text and "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


SECRETS = {"WANDB_API_KEY": "wandb-secret-9f3c1e", "AWS_SECRET_ACCESS_KEY": "aws-secret-7d2b4a",
           "RAY_AUTH_TOKEN": "ray-token-5e8f0c", "HF_TOKEN": "hf-secret-1a6d9b"}  # fmt: skip
# Planted in the run's config: a literal in a runtime env's variables and an ${oc.env:...} reference (its variable
# set only in the environment).
PLANTED = {"env_vars": "runtime-env-secret-3c9a", "oc.env": "oc-env-secret-b81f"}
OVERRIDES = ["+cluster.runtime_env={env_vars:{MY_VAR:runtime-env-secret-3c9a,MY_TOKEN:'${oc.env:PLANTED_TOKEN}'}}"]


def test_secrets_never_reach_the_store_wandb_ray_logs_or_stdout(tmp_path):
    """A real run with secrets in its environment and its config, then every byte it wrote is searched."""
    store, ray_tmp = tmp_path / "store", Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, with the secrets
    env.update(SECRETS, PLANTED_TOKEN=PLANTED["oc.env"], PYTHONPATH=str(ROOT), WANDB_MODE="offline",
               RAY_TMPDIR=str(ray_tmp))  # fmt: skip
    command = [sys.executable, "-m", "gptline", "run", "--registry", REGISTRY, "--config-dir", CONFIG_DIR,
               f"store.root={store}", "tracking=offline", *OVERRIDES]  # fmt: skip
    try:
        out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        written = [p for root in (store, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_socket()]
        assert any("wandb" in str(p) for p in written) and any(p.name == "config.json" for p in written)
        assert any(p.name == "raylet.out" for p in written) and any(p.name == "report.html" for p in written)
        for name, secret in {**SECRETS, **PLANTED}.items():
            assert secret not in out.stdout + out.stderr, f"{name} printed"
            for path in written:
                assert secret.encode() not in path.read_bytes(), f"{name} found in {path}"
        record = json.loads((store / "runs" / sorted(os.listdir(store / "runs"))[0] / "config.json").read_text())
        assert record["cluster"]["runtime_env"]["env_vars"] == {"MY_VAR": "<redacted>",
                                                                "MY_TOKEN": "${oc.env:PLANTED_TOKEN}"}  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_config_names_cannot_escape_the_artifact():
    specs = load_registry("stages:REGISTRY")
    with pytest.raises(ConfigError, match=r"fetch\.archives\.\.\./escape"):
        compose_config(specs, ["+fetch.archives.../escape.package=x"], DEFAULT_CONFIG_DIR)
    bad = fetch.ArchiveConfig(package="p", version="1", filename="../../evil.whl", sha256="a" * 64)
    assert [k for k, _ in bad.validate()] == ["filename"]


@pytest.mark.parametrize("name", ["../../outside.txt", "/etc/passwd", "pkg/../../outside.txt"])
def test_archive_members_cannot_escape_the_artifact(tmp_path, name):
    archive = tmp_path / "evil-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(GptlineError, match="outside the artifact"):
        fetch.archive_members(archive, ["*"])


def test_refs_and_run_ids_from_the_command_line_cannot_escape_the_store(tmp_path, capsys):
    from gptline.cli.main import main

    (tmp_path / "store").mkdir()
    assert main(["show", "../../etc/passwd", "--store", str(tmp_path / "store")]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--run-id", "../escape", "--dry-run"])
    assert not list(Path(tmp_path).glob("escape*"))


@pytest.mark.parametrize("command", ["resume", "status", "report"])
def test_run_ids_given_to_resume_status_and_report_cannot_escape_the_runs_directory(tmp_path, command):
    from gptline.cli.main import main

    outside = tmp_path / "store" / "escape"
    outside.mkdir(parents=True)
    (outside / "run.json").write_text(json.dumps({"run_id": "x", "registry": "stages:REGISTRY", "nodes": []}))
    (tmp_path / "store" / "runs" / "ok").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main([command, "../escape", "--store", str(tmp_path / "store")])


EVIL_REGISTRY = """
from pathlib import Path
Path(__file__).with_name("imported").touch()
from tests.parquet_stages import REGISTRY
"""


def test_resume_and_report_run_no_code_the_record_names_unless_trusted(pipeline, tmp_path, monkeypatch, capsys):
    (tmp_path / "evil_registry.py").write_text(EVIL_REGISTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert pipeline.run() == 0
    record = pipeline.store / "runs" / pipeline.latest_run()
    meta = json.loads((record / "run.json").read_text())
    (record / "run.json").write_text(json.dumps({**meta, "registry": "evil_registry:REGISTRY"}))
    capsys.readouterr()
    assert pipeline.resume(meta["run_id"]) == 2
    error = capsys.readouterr().err
    assert "'evil_registry:REGISTRY'" in error and f"'{REGISTRY}'" in error and "--trust-record" in error
    assert pipeline.cli("report", "--registry", REGISTRY) == 2
    assert not (tmp_path / "imported").exists()

    (record / "run.json").write_text(json.dumps(meta))
    config = json.loads((record / "config.json").read_text())
    config["cluster"]["runtime_env"] = {"py_modules": ["s3://attacker/payload.zip"]}
    (record / "config.json").write_text(json.dumps(config))
    assert pipeline.resume(meta["run_id"]) == 2
    assert "cluster.runtime_env" in capsys.readouterr().err

    (record / "run.json").write_text(json.dumps({**meta, "registry": "evil_registry:REGISTRY"}))
    assert pipeline.resume(meta["run_id"], "--trust-record") == 0  # the operator vouches for the store
    assert (tmp_path / "imported").exists()


def test_a_run_recorded_without_its_secrets_resumes_with_them_given_again(pipeline, capsys):
    secret = "+cluster.runtime_env={env_vars:{MY_VAR:resume-secret-6e0d}}"
    assert pipeline.run(secret, "run.max_retries=0", "numbers.chunks=3") == 0
    run_id = pipeline.latest_run()
    assert "resume-secret-6e0d" not in (pipeline.store / "runs" / run_id / "config.json").read_text()
    assert pipeline.resume(run_id) == 2  # the record's runtime env is not this command's
    assert "cluster.runtime_env" in capsys.readouterr().err
    assert pipeline.resume(run_id, secret) == 0


BACKEND = """
from pathlib import Path
Path(MARKER).touch()
def get_requires_for_build_wheel(config_settings=None):
    return []
def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    raise RuntimeError("the backend ran")
"""


def test_an_sdist_is_checked_against_its_sha256_before_its_build_backend_runs(tmp_path, monkeypatch):
    """A registry (here a local find-links directory) serving a tampered sdist: pip must refuse it by hash, never
    run the build backend it carries."""
    source = tmp_path / "evil-1.0"
    source.mkdir()
    (source / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                                           'backend-path = ["."]\n[project]\nname = "evil"\nversion = "1.0"\n')  # fmt: skip
    (source / "backend.py").write_text(f"MARKER = {str(tmp_path / 'backend-ran')!r}\n" + BACKEND)
    (source / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    index = tmp_path / "index"
    index.mkdir()
    with tarfile.open(index / "evil-1.0.tar.gz", "w:gz") as tf:
        tf.add(source, arcname="evil-1.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    archive = fetch.ArchiveConfig(package="evil", version="1.0", filename="evil-1.0.tar.gz", sha256="ab" * 32)
    with pytest.raises(GptlineError, match="evil-1.0.tar.gz"):
        fetch.download(archive, tmp_path / "cache", "evil")
    assert not (tmp_path / "backend-ran").exists()


class Site(http.server.BaseHTTPRequestHandler):
    """A site to crawl: links to a page, a huge page, an off-site redirect, a side-effect module's page and another
    host; a robots.txt that never answers in time. Every request is noted on the server."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        other = f"http://127.0.0.1:{self.server.other_port}"
        pages = {"/": f'<a href="/a.html">a</a> <a href="/big.html">big</a> <a href="/away">away</a> '
                      f'<a href="/this.html">this</a> <a href="{other}/x.html">x</a>',
                 "/a.html": "<p>a page</p>", "/big.html": "x" * 5000, "/this.html": "<p>import this</p>"}  # fmt: skip
        if self.path == "/robots.txt":
            time.sleep(5)  # then hang up without an answer
            return
        if self.path == "/away":
            self.send_response(302)
            self.send_header("Location", f"{other}/stolen")
            self.end_headers()
            return
        body = pages.get(self.path, "").encode()
        self.send_response(200 if self.path in pages else 404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def sites():
    servers = []
    for _ in range(2):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
        server.requests = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    servers[0].other_port, servers[1].other_port = servers[1].server_port, servers[0].server_port
    yield servers
    for server in servers:
        server.shutdown()


def test_the_crawl_stays_on_its_site_bounds_bodies_times_out_robots_and_skips_side_effect_pages(sites, tmp_path):
    site, other = sites
    cfg = fetch.CrawlConfig(timeout_s=1.0, max_body_bytes=1000, seeds=["/"])
    start = time.time()
    counts = fetch.crawl(f"http://127.0.0.1:{site.server_port}/", cfg, tmp_path, fetch.CANONICAL_HOST)
    assert time.time() - start < 4.5  # robots.txt waited for timeout_s, not for its 5 s
    assert other.requests == []  # neither the link to the other host nor the redirect there was followed
    assert "/this.html" not in site.requests and counts["excluded"] == 1
    assert counts["oversized"] == 1 and counts["fetched"] == 3  # /, /a.html and the recorded 302 of /away
    for seed in (
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        f"http://127.0.0.1:{other.server_port}/",
    ):
        with pytest.raises(GptlineError, match=r"fetch\.crawl\.seeds\[0\]"):
            fetch.crawl(
                f"http://127.0.0.1:{site.server_port}/",
                dataclasses.replace(cfg, seeds=[seed]),
                tmp_path,
                fetch.CANONICAL_HOST,
            )
    assert [key for key, _ in fetch.CrawlConfig(seeds=["file:///etc/passwd"]).validate()] == ["seeds[0]"]
