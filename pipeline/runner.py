"""Runs a selection of the DAG on Ray, reusing committed artifacts and resuming partial ones.

Each stage to build becomes one Ray task whose arguments are the results of its upstream tasks, so Ray sees the
whole graph and runs independent stages concurrently. Inside the task (`build_node`):

1. take the artifact's build lease, so two runs needing the same version build it once (the other waits, then
   finds it committed and reuses it);
2. verify and localize the inputs, open the stage's work directory (`<version>.partial/`, possibly holding earlier
   partial work: the stage resumes from it);
3. call the stage function with its typed config, tee its output to the run's log, track its metrics (a stage
   that stops on request checkpoints on SIGTERM and fails the node with StageStopped; resume continues it);
4. commit: checksums, manifest last, atomic rename.

A user error (GptlineError) fails the node without retries; any other exception or a dead worker is retried by Ray
up to `run.max_retries` times, each attempt resuming from the partial directory. A SIGTERM to the driver (a
preemption notice) is passed on: each running stage that stops on request gets SIGTERM on its own node and
checkpoints, every stage not yet finished is cancelled (a running one keeps its partial work), and the run ends
failed, ready for `gptline resume`; a second SIGTERM ends the driver at once. A run's record lives in the store
under `runs/<run_id>/` (composed config, every node's version and state, logs, metrics), so `resume`, `status`
and `report` work from any machine that sees the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import redact
from pipeline.artifacts import RUNS_DIR, Store
from pipeline.config import typed
from pipeline.dag import DAG, StageContext, StageResources, StageSpec, stage_choices, stop_on_sigterm
from pipeline.errors import DagError, GptlineError, StoreError
from pipeline.progress import BAR_STATE_TAG, Progress, default_mode
from pipeline.tracking import Tracker


def new_run_id() -> str:
    """Sortable by start time (to the millisecond), unique by its random suffix."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"{int(now % 1 * 1000):03d}-{uuid.uuid4().hex[:6]}"


class RunRecord:
    """`runs/<run_id>/` in the store: run.json, config.json, nodes/<stage>.json, logs/, metrics/, wandb/.

    Logs, metrics and wandb files are written to a local directory as they happen: the record itself on a local
    store, a scratch copy uploaded by `publish()` on an object store.
    """

    def __init__(self, store: Store, run_id: str, scratch: Path):
        self.store, self.run_id = store, run_id
        self.path = store.path(RUNS_DIR, run_id)
        self.local = Path(self.path) if store.is_local else scratch / RUNS_DIR / run_id

    def meta(self) -> dict[str, Any]:
        try:
            return self.store.read_json(self.path + "/run.json")
        except (FileNotFoundError, OSError) as e:
            raise StoreError(f"no run {self.run_id!r} in store {self.store.uri}") from e

    def config(self) -> dict[str, Any]:
        return self.store.read_json(self.path + "/config.json")

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.store.write_json(self.path + "/run.json", {**meta, "updated": time.time()})

    def update_meta(self, **fields: Any) -> None:
        self.write_meta({**self.meta(), **fields})

    def write_config(self, config: dict[str, Any]) -> None:
        self.store.write_json(self.path + "/config.json", redact.redact_config(config))

    def node(self, stage: str) -> dict[str, Any]:
        try:
            return self.store.read_json(f"{self.path}/nodes/{stage}.json")
        except (FileNotFoundError, OSError):
            return {"stage": stage, "state": "pending"}

    def set_node(self, stage: str, **fields: Any) -> None:
        self.store.write_json(f"{self.path}/nodes/{stage}.json", {**self.node(stage), **fields})

    def local_file(self, rel: str) -> Path:
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self) -> None:
        if not self.store.is_local and self.local.exists():
            pafs.copy_files(str(self.local), self.path, destination_filesystem=self.store.fs)


def as_built(store: Store, stage: str, version: str, node: dict[str, Any]) -> dict[str, Any]:
    """A node record; a reused one with the figures of the build it reuses (metrics, duration, and `built`, when
    that build ended), from the artifact's manifest, since the reusing run measured nothing."""
    if node.get("state") != "reused" or not store.is_committed(stage, version):
        return node
    manifest = store.load(stage, version, verify="none").manifest
    metrics, timings = manifest.get("metrics", {}), manifest.get("timings", {})
    return {**node, "metrics": metrics, "headline": node.get("headline") or list(metrics)[:4],
            "seconds": timings.get("seconds"), "built": timings.get("end", time.time())}  # fmt: skip


def list_runs(store: Store) -> list[str]:
    infos = store.list_dir(store.path(RUNS_DIR))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


# ---- the work done inside a stage's Ray task ------------------------------------------------------------------
@dataclass
class NodeJob:
    """Everything a stage task needs; pickled to the worker that runs it."""

    store: Store
    run_id: str
    spec: StageSpec
    version: str
    config: Any  # the stage's resolved config subtree (plain data)
    inputs: dict[str, str]  # input stage -> version
    slots: dict[str, str]  # the name the stage reads each input under -> the input stage
    resources: StageResources
    tracking: dict[str, Any]
    verify: str
    lock_ttl_s: float
    lock_heartbeat_s: float
    scratch: str
    quiet: bool
    progress: Progress
    rebuild: bool = False  # replace the committed artifact of this version (it was found corrupt)
    secrets: dict[str, str] = field(default_factory=dict)  # the driver's, for redaction (pipeline.redact)


@dataclass
class NodeOutcome:
    stage: str
    version: str
    state: str  # done, reused or failed
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False
    host: str = ""
    node_id: str = ""


class _Tee(io.TextIOBase):
    def __init__(self, *streams: Any):
        self.streams = streams

    def write(self, text: str) -> int:
        text = redact.redact_text(text)
        for i, stream in enumerate(self.streams):
            if i == 0 or BAR_STATE_TAG not in text:  # progress-bar state is for the driver's screen, not the log
                stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def _capture_output(log_path: Path) -> Iterator[None]:
    """Tee the stage's prints and logging into its log file in the run record (Ray also streams them)."""
    with open(log_path, "a", buffering=1) as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(saved[0], log), _Tee(saved[1], log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
            root.removeHandler(handler)


@ray.remote(num_cpus=0)
class LockTable:
    """Build leases for stores without a local filesystem (object stores), shared by every driver of a cluster."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}
        self.id = uuid.uuid4().hex  # names this Ray cluster in an object store's writer claim

    def cluster(self) -> str:
        return self.id

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        holder = self.leases.get(key)
        if holder is None or holder[0] == owner or holder[1] < time.time():
            self.leases[key] = (owner, time.time() + ttl_s)
            return True
        return False

    def release(self, key: str, owner: str) -> None:
        if self.leases.get(key, ("", 0))[0] == owner:
            del self.leases[key]


def _lock_table() -> Any:
    return LockTable.options(name="gptline-locks", lifetime="detached", get_if_exists=True).remote()


def cluster_id() -> str:
    """This Ray cluster's identity, for the single-writer rule of object stores (Store.claim_writer)."""
    return ray.get(_lock_table().cluster.remote())


@contextlib.contextmanager
def _build_lease(job: NodeJob) -> Iterator[None]:
    """The lease stored beside the artifact; on an object store, this cluster's drivers take turns first."""
    lease = job.store.lock(job.spec.name, job.version, job.lock_ttl_s, job.lock_heartbeat_s)
    if job.store.is_local:
        with lease:
            yield
        return
    table = _lock_table()
    key, owner, stop = f"{job.store.uri}/{job.spec.name}/{job.version}", uuid.uuid4().hex, threading.Event()
    while not ray.get(table.acquire.remote(key, owner, job.lock_ttl_s)):
        time.sleep(1.0)

    def renew() -> None:
        while not stop.wait(job.lock_heartbeat_s):
            ray.get(table.acquire.remote(key, owner, job.lock_ttl_s))

    beat = threading.Thread(target=renew, daemon=True)
    beat.start()
    try:
        with lease:
            yield
    finally:
        stop.set()
        beat.join()
        ray.get(table.release.remote(key, owner))


class RayMap:
    """`StageContext.map` under the runner: one Ray task per item, a bounded number in flight, results in order."""

    def __init__(self, stage: str, resources: StageResources, progress: Progress):
        self.stage, self.resources, self.progress = stage, resources, progress

    def __call__(self, fn: Any, items: list[Any], desc: str = "") -> list[Any]:
        remote = ray.remote(fn).options(
            num_cpus=self.resources.cpus_per_worker, num_gpus=self.resources.gpus_per_worker
        )
        window = max(1, self.resources.num_workers)  # exactly num_workers at once (~1 ms gap between tasks)
        results: dict[int, Any] = {}
        in_flight: dict[ray.ObjectRef, int] = {}
        next_item = 0
        with self.progress(len(items), f"[{self.stage}] {desc or getattr(fn, '__name__', 'map')}") as bar:
            while next_item < len(items) or in_flight:
                while next_item < len(items) and len(in_flight) < window:
                    in_flight[remote.remote(items[next_item])] = next_item
                    next_item += 1
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                results[in_flight.pop(ref)] = ray.get(ref)
                bar.update(1)
        return [results[i] for i in range(len(items))]


def build_node(job: NodeJob, *upstream: NodeOutcome) -> NodeOutcome:
    """Build one artifact (runs as a Ray task; also callable directly)."""
    stage, version, store = job.spec.name, job.version, job.store
    host = socket.gethostname()
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    outcome = NodeOutcome(stage, version, "failed", host=host, node_id=node_id)
    redact.learn(job.secrets)
    broken = [u.stage for u in upstream if u.state == "failed"]
    if broken:
        outcome.error = f"not run: input {broken[0]!r} failed"
        return outcome

    # Absolute here, on the stage's node: Ray Train runs its workers in a directory of its own.
    scratch = Path(job.scratch).expanduser().absolute()
    record = RunRecord(store, job.run_id, scratch)
    started = time.time()
    record.set_node(
        stage, state="running", version=version, started=started, host=host, pid=os.getpid(), node_id=node_id
    )
    try:
        with _capture_output(record.local_file(f"logs/{stage}.log")), _build_lease(job):
            # A retry of this task finds what its own earlier attempt committed before failing: that one is kept.
            if job.rebuild and store.is_committed(stage, version) and _built_by_another_run(store, job):
                store.retire(stage, version)
                print(f"[{stage}] rebuilding {version}: the committed artifact was retired", flush=True)
            if store.is_committed(stage, version):  # another run (or an earlier attempt) built it meanwhile
                store.drop_transient(stage, version)
                outcome.state = "reused"
                return outcome
            try:
                outcome.metrics = _run_stage(job, store, record, scratch, started, outcome)
                outcome.state = "done"
            except GptlineError as e:
                print(f"[{stage}] error: {e}", file=sys.stderr)
                outcome.error = str(e)
            except BaseException:
                traceback.print_exc()
                raise
            finally:
                outcome.seconds = time.time() - started
    finally:
        record.publish()
    return outcome


def _built_by_another_run(store: Store, job: NodeJob) -> bool:
    return store.load(job.spec.name, job.version, verify="none").manifest.get("run_id") != job.run_id


def _run_stage(
    job: NodeJob, store: Store, record: RunRecord, scratch: Path, started: float, outcome: NodeOutcome
) -> dict[str, Any]:
    stage, version = job.spec.name, job.version
    artifacts = {name: store.load(name, ver, verify=job.verify) for name, ver in job.inputs.items()}
    local = {name: store.localize(artifact, scratch) for name, artifact in artifacts.items()}
    inputs = {slot: local[name] for slot, name in job.slots.items()}
    workdir, outcome.resumed = store.open_workdir(stage, version, scratch)
    if outcome.resumed:
        print(f"[{stage}] resuming from partial work in {workdir}")
    tracker = Tracker(
        run_id=job.run_id,
        stage=stage,
        version=version,
        config=redact.redact_config(job.config if isinstance(job.config, dict) else {"value": job.config}),
        metrics_path=record.local_file(f"metrics/{stage}.jsonl"),
        wandb_dir=record.local / "wandb",
        **job.tracking,
    )
    ctx = StageContext(
        stage=stage,
        version=version,
        run_id=job.run_id,
        resumed=outcome.resumed,
        resources=job.resources,
        quiet=job.quiet,
        progress=job.progress,
        log=tracker.log,
        save_partial=lambda: store.save_partial(stage, version, workdir),
        map=RayMap(stage, job.resources, job.progress),
        mirror=store.mirror(stage, version, workdir, {local[name]: artifacts[name] for name in artifacts}),
    )
    stoppable = stop_on_sigterm(workdir, stage, ctx.mirror) if job.spec.stops_on_request else contextlib.nullcontext()
    try:
        with stoppable:
            metrics = dict(job.spec.run(typed(job.spec.config_class, job.config), inputs, workdir, ctx) or {})
    except BaseException:
        tracker.finish(failed=True)
        store.save_partial(stage, version, workdir)
        raise
    tracker.finish(summary=metrics)
    ended = time.time()
    store.commit(
        stage,
        version,
        workdir,
        {
            "stage_version": job.spec.version,
            "config": redact.redact_config(job.config),
            "unversioned": redact.redact_config(job.spec.unversioned(job.config)),  # values used, not versioned
            "inputs": job.inputs,
            "metrics": metrics,
            "timings": {"start": started, "end": ended, "seconds": ended - started},
            "run_id": job.run_id,
            "resumed": outcome.resumed,
        },
    )
    return metrics


# ---- the driver --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodePlan:
    stage: str
    version: str
    action: str  # reuse, resume, run or rebuild


# Ray Train workers re-log every print() through a logger as well as to stdout, so each progress line reached the
# terminal twice; stdout alone is what the run's log and the terminal show.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the entrypoint of a submitted job


def connect_ray(cluster: dict[str, Any]) -> bool:
    """Join the configured cluster, or start an embedded Ray. True when this call started Ray."""
    if ray.is_initialized():
        return False
    runtime_env = dict(cluster["runtime_env"] or {})
    env_vars = {**WORKER_ENV, **(runtime_env.pop("env_vars", None) or {})}
    address = cluster["address"] or os.environ.get("RAY_ADDRESS")
    if address:
        runtime_env["env_vars"] = env_vars
    else:  # the workers of an embedded Ray inherit this environment; Ray's agent logs a runtime env in full
        os.environ.update(env_vars)
    kwargs: dict[str, Any] = {"namespace": cluster["namespace"], "log_to_driver": True, "runtime_env": runtime_env}
    if JOB_DRIVER_ENV in os.environ:  # the driver of a submitted Ray Job: the job already carries its runtime env
        kwargs.pop("runtime_env")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard (on localhost only) also serves the state API that Ray Train's cleanup monitor polls.
        ray.init(num_cpus=cluster["num_cpus"], include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    return True


@ray.remote(num_cpus=0)
def _send_signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


class Runner:
    """Plans and executes one run of a selection of the DAG against a store."""

    def __init__(self, dag: DAG, config: dict[str, Any], store: Store, selection: list[str], run_id: str,
                 rebuild: tuple[str, ...] = ()):  # fmt: skip
        self.dag, self.config, self.store, self.run_id = dag, config, store, run_id
        self.selection, self.rebuild = selection, set(rebuild)
        unselected = sorted(self.rebuild - set(selection))
        if unselected:
            raise DagError(f"--rebuild {' '.join(unselected)}: not in this run's selection")
        # What the choices of inputs and the versions are read from: each stage's config subtree by its key, and the
        # keys of the stage choices.
        self.configs = {spec.key: config.get(spec.key) for spec in dag.specs.values()}
        self.configs |= {choice.key: config.get(choice.key) for choice in stage_choices(dag.specs.values())}
        self.versions = dag.versions(self.configs, selection)
        self.scratch = Path(config["run"]["scratch_dir"]).expanduser()
        self.record = RunRecord(store, run_id, self.scratch)
        self.quiet = config["run"]["quiet"]
        self.sigterm = 0  # SIGTERMs received while executing

    def plan(self) -> list[NodePlan]:
        """What would happen, without starting anything; errors when a selected stage's input is unavailable."""
        plans = []
        for name in self.selection:
            version = self.versions[name]
            for dep in self.dag.specs[name].input_stages(self.configs):
                if dep not in self.selection and not self.store.is_committed(dep, self.versions[dep]):
                    raise DagError(
                        f"stage {name!r} needs input {dep!r} (version {self.versions[dep]}), which is not "
                        f"committed in {self.store.uri}; include it in the selection"
                    )
            if self.store.is_committed(name, version):
                action = "rebuild" if name in self.rebuild else "reuse"
            elif self.store.has_partial(name, version):
                action = "resume"
            else:
                action = "run"
            plans.append(NodePlan(name, version, action))
        return plans

    def _job(self, name: str) -> NodeJob:
        spec = self.dag.specs[name]
        run_cfg = self.config["run"]
        return NodeJob(
            store=self.store,
            run_id=self.run_id,
            spec=spec,
            version=self.versions[name],
            config=self.config.get(spec.key),
            inputs={dep: self.versions[dep] for dep in spec.input_stages(self.configs)},
            slots=spec.slots(self.configs),
            resources=typed(StageResources, self.config["cluster"]["resources"].get(name, {})),
            tracking=self.config["tracking"],
            verify=self.config["store"]["verify"],
            lock_ttl_s=run_cfg["lock_ttl_s"],
            lock_heartbeat_s=run_cfg["lock_heartbeat_s"],
            scratch=run_cfg["scratch_dir"],
            quiet=self.quiet,
            progress=Progress(default_mode(self.quiet)),  # decided here, where the user's terminal is
            secrets=redact.known(),
        )

    def say(self, text: str) -> None:
        if not self.quiet:
            print(time.strftime("%H:%M:%S"), text, flush=True)

    def execute(self, plans: list[NodePlan]) -> bool:
        """Run the plan on Ray; record every node's state; True when every selected node is done or reused."""
        self.record.update_meta(status="running", driver_host=socket.gethostname(), driver_pid=os.getpid())
        started_ray = connect_ray(self.config["cluster"])
        on_main_thread = threading.current_thread() is threading.main_thread()  # sweep points run on threads
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if on_main_thread else None
        cluster = ""
        try:
            cluster = "" if self.store.is_local else cluster_id()
            self.store.claim_writer(cluster, self.config["run"]["lock_ttl_s"])
            return self._execute(plans, cluster)
        except BaseException as e:
            self.record.update_meta(status="failed", error=f"driver stopped: {type(e).__name__}: {e}")
            raise
        finally:
            if cluster:
                self.store.release_writer(cluster)
            if on_main_thread:
                signal.signal(signal.SIGTERM, previous)
            if started_ray:
                ray.shutdown()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Only note it: the wait loop passes it on (Ray calls are not safe inside a signal handler)."""
        self.sigterm += 1
        if self.sigterm > 1:
            raise SystemExit(128 + signum)

    def _stop_running_stages(self, pending: dict[ray.ObjectRef, str]) -> None:
        self.say("SIGTERM: the running training stages checkpoint and stop; nothing new starts")
        for ref, stage in pending.items():
            node = self.record.node(stage)
            if self.dag.specs[stage].stops_on_request and node.get("state") == "running" and node.get("pid"):
                strategy = NodeAffinitySchedulingStrategy(node["node_id"], soft=False) if node.get("node_id") else None
                _send_signal.options(scheduling_strategy=strategy).remote(node["pid"], signal.SIGTERM)
            else:
                ray.cancel(ref)  # one waiting never starts; one running keeps its partial work

    def _execute(self, plans: list[NodePlan], cluster: str) -> bool:
        task = ray.remote(build_node)
        results: dict[str, Any] = {}
        pending: dict[ray.ObjectRef, str] = {}
        for plan in plans:
            spec = self.dag.specs[plan.stage]
            previous = self.record.node(plan.stage)
            if plan.action == "reuse":
                self.store.drop_transient(plan.stage, plan.version)
                keep_done = previous.get("state") == "done" and previous.get("version") == plan.version
                state = "done" if keep_done else "reused"
                self.record.set_node(plan.stage, state=state, version=plan.version, error="")
                self.say(f"{plan.stage:<12} {plan.version}  {state}")
                results[plan.stage] = NodeOutcome(plan.stage, plan.version, state)
                continue
            upstream = [results.get(dep, NodeOutcome(dep, self.versions[dep], "reused"))
                        for dep in spec.input_stages(self.configs)]  # fmt: skip
            job = dataclasses.replace(self._job(plan.stage), rebuild=plan.action == "rebuild")
            self.record.set_node(plan.stage, state="pending", version=plan.version, error="")
            ref = task.options(
                name=f"{plan.stage}:{plan.version}",
                num_cpus=0 if spec.starts_workers else job.resources.num_cpus,
                num_gpus=0 if spec.starts_workers else job.resources.num_gpus,
                max_retries=self.config["run"]["max_retries"],
                retry_exceptions=True,
            ).remote(job, *upstream)
            self.say(f"{plan.stage:<12} {plan.version}  {'resuming' if plan.action == 'resume' else 'queued'}")
            results[plan.stage] = ref
            pending[ref] = plan.stage

        failed: set[str] = set()
        stopping = False
        renewed = time.time()
        while pending:
            ray.wait(list(pending), num_returns=1, timeout=1.0)  # wakes for a SIGTERM within a second
            if time.time() - renewed >= self.config["run"]["lock_heartbeat_s"]:
                self.store.renew_writer(cluster)
                renewed = time.time()
            if self.sigterm and not stopping:
                stopping = True
                self._stop_running_stages(pending)
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            # Upstream before downstream, so a failure propagated by Ray is reported as "input failed".
            for ref in sorted(ready, key=lambda r: self.dag.order.index(pending[r])):
                stage = pending.pop(ref)
                outcome = self._outcome(stage, ref, failed)
                if outcome.state == "failed":
                    failed.add(stage)
                self._record(outcome)
        if stopping:
            self.record.update_meta(status="failed", error="stopped by SIGTERM; `gptline resume` continues the run")
        else:
            self.record.update_meta(status="failed" if failed else "done")
        return not failed

    def _outcome(self, stage: str, ref: ray.ObjectRef, failed: set[str]) -> NodeOutcome:
        try:
            return ray.get(ref)
        except (ray.exceptions.RayError, GptlineError) as e:
            broken = [dep for dep in self.dag.specs[stage].input_stages(self.configs) if dep in failed]
            error = f"not run: input {broken[0]!r} failed" if broken else _one_line(e)
            if isinstance(e, ray.exceptions.TaskCancelledError):
                error = "cancelled: the run was stopped by SIGTERM"
            return NodeOutcome(stage, self.versions[stage], "failed", error=error)

    def _record(self, outcome: NodeOutcome) -> None:
        self.record.set_node(
            outcome.stage,
            state=outcome.state,
            version=outcome.version,
            error=outcome.error,
            seconds=round(outcome.seconds, 3),
            metrics=outcome.metrics,
            headline=list(outcome.metrics)[:4],  # the stage's own order (the record's JSON is key-sorted)
            resumed=outcome.resumed,
            ended=time.time(),
        )
        detail = f"in {outcome.seconds:.1f} s" if outcome.state == "done" else outcome.error
        self.say(f"{outcome.stage:<12} {outcome.version}  {outcome.state}  {detail}".rstrip())


def _one_line(error: BaseException) -> str:
    """The root cause of a Ray task failure, on one line."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.WorkerCrashedError) or "WorkerCrashedError" in type(error).__name__:
        return "the stage's worker process died (killed or crashed); resume continues from its partial work"
    if cause is not None and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}"
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
