"""A real two-node Ray cluster on this machine, for the cluster tests: `ray start --head`, then `ray start --address`
with its own temp dir, token authentication on, every port chosen free (so it lives beside the test session's own
Ray instance), and a worker node that can be killed."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class TwoNodeCluster:
    """`private_dir`: a path the worker node sees as a directory of its own (a bind mount in a private mount
    namespace; needs root), as separate machines each have their own local disk at the same path."""

    def __init__(self, root: Path, head_cpus: int = 1, worker_cpus: int = 1, private_dir: Path | None = None):
        self.root, self.head_cpus, self.worker_cpus, self.private_dir = root, head_cpus, worker_cpus, private_dir
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # As cluster/README.md starts it: `.venv/bin/ray start`, the virtualenv not on PATH (a submitted job must
        # find the cluster's Python by itself).
        path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PATH=path)
        gcs, dashboard = free_ports(2)
        self.gcs_address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        self._gcs_port, self._dashboard_port = gcs, dashboard
        self.worker: subprocess.Popen | None = None
        self.workers_started = 0

    @staticmethod
    def _node_ports() -> list[str]:
        agent, grpc, metrics, runtime_env, manager = free_ports(5)
        return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                f"--node-manager-port={manager}"]  # fmt: skip

    def start(self) -> TwoNodeCluster:
        head = [str(BIN / "ray"), "start", "--head", f"--port={self._gcs_port}", f"--num-cpus={self.head_cpus}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self._dashboard_port}",
                f"--temp-dir={self.root / 'head'}", "--disable-usage-stats", *self._node_ports()]  # fmt: skip
        subprocess.run(head, env=self.env, check=True, capture_output=True, timeout=180)
        self.add_worker()
        return self

    def add_worker(self) -> None:
        """A worker node with its own temp dir (a replacement, after `kill_worker`)."""
        self.workers_started += 1
        name = f"worker{self.workers_started}"
        worker = [str(BIN / "ray"), "start", f"--address={self.gcs_address}", f"--num-cpus={self.worker_cpus}",
                  f"--temp-dir={self.root / name}", "--disable-usage-stats", "--block", *self._node_ports()]  # fmt: skip
        if self.private_dir is not None:
            own = self.root / f"{name}-private"
            own.mkdir()
            self.private_dir.mkdir(parents=True, exist_ok=True)
            worker = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                      'mount --bind "$0" "$1" && shift && exec "$@"', str(own), str(self.private_dir), *worker]  # fmt: skip
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (the node outlives this call)
        self.worker = subprocess.Popen(worker, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.wait_for_nodes(2)

    def alive_nodes(self) -> int:
        script = "import ray; ray.init(address='auto'); print(sum(n['Alive'] for n in ray.nodes()))"
        out = subprocess.run([sys.executable, "-c", script], env={**self.env, "RAY_ADDRESS": self.gcs_address},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while self.alive_nodes() != count:
            if time.time() > deadline:
                raise TimeoutError(f"the cluster did not reach {count} alive nodes")
            time.sleep(2)

    def kill_worker(self) -> None:
        """The worker node dies: its `ray start --block` and every process of its session."""
        if self.worker is not None:
            self.worker.send_signal(signal.SIGKILL)
            self.worker.wait()
        subprocess.run(["pkill", "-9", "-f", str(self.root / f"worker{self.workers_started}")], check=False)

    def stop(self) -> None:
        subprocess.run(["pkill", "-9", "-f", str(self.root)], check=False)
