"""Stages and the graph they form.

A stage is declared by a `StageSpec`: its name, the stages whose artifacts it consumes, the config key of its
subtree, its VERSION, the plain function that does the work, and the resources it asks for. Which stages exist is
a registry, a list of specs named as "module:attribute" (`stages:REGISTRY` for the recipe), so this module knows
nothing about what the stages compute.

A stage function has the signature `run(cfg, inputs, out_dir, ctx) -> metrics`: `cfg` is its typed config object,
`inputs` maps each input stage name to the local directory of that input's committed artifact, `out_dir` is the
directory it writes into (it may already hold its own earlier partial work: `ctx.resumed` says so), and the
returned dict of numbers goes into the manifest.

An input may be chosen by config (`InputChoice`): the stage reads it under one name (its slot) whichever stage
the config picks to fill it, so one recipe serves, say, a base model made by one stage or brought in by another. A
`StageChoice` is a top-level config key naming any number of alternative stages (`alignment=[ppo,dpo]`): a stage
that takes whichever are chosen has one such input per option, filled only when the key names it. A run builds the stages its selection needs: by default the graph's ends (stages no stage can take as input) and,
through the inputs the config chooses, what they need; a stage no chosen input reaches is not built. The edges of
every possible choice must form a DAG, so any configuration's graph does. A stage whose config only names its
input data (a path to files another tool wrote) says what its output really depends on with `identity`: the
version hashes what that returns (the files' content, say) instead of the config, so the same files give one
artifact wherever they lie, and changed files a new one. Otherwise the version hashes the config subtree less the
fields its dataclass marks unversioned (`pipeline/versioning.py`).

A stage that can stop early (`StageSpec.stops_on_request`, the training stages) polls `stop_requested(out_dir)`
and, when it turns true, checkpoints and raises `StageStopped`. While such a stage runs, `stop_on_sigterm` turns a
SIGTERM to its process (a preemption notice from Slurm, Kubernetes or a person) into that request instead of an
immediate exit, so the work since the last scheduled checkpoint is not lost.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import NAME_RE, RUNS_DIR, TRANSIENT, NodeMirror, artifact_version
from pipeline.checks import at_least
from pipeline.errors import DagError
from pipeline.progress import Progress
from pipeline.versioning import split


@dataclass
class StageResources:
    """What a stage asks the scheduler for. Never part of an artifact's version.

    A stage that starts its own group of workers (a Ray Train trainer, a pool of shard tasks) sizes it with
    `num_workers` x (`cpus_per_worker`, `gpus_per_worker`) and its own task reserves nothing, so that on a small
    machine the waiting task does not hold the cores its workers need.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Compute threads per worker. 0: the cores of the worker's node shared evenly by the workers there, so a group
    # that does not fill the machine (one worker on a laptop) still uses every core.
    threads_per_worker: int = 0

    def validate(self) -> list[tuple[str, str]]:
        keys = ("num_cpus", "num_gpus", "cpus_per_worker", "gpus_per_worker", "threads_per_worker")
        return at_least(self, 0, *keys) + at_least(self, 1, "num_workers")


STOP_REQUEST = "STOP_REQUEST"  # a file in a stage's work directory: checkpoint and stop


def stop_requested(out_dir: Path) -> bool:
    return (Path(out_dir) / STOP_REQUEST).exists()


@dataclass(frozen=True)
class StopSignal:
    """Whether a stage has been asked to stop, as its workers on any node can tell: the marker in their node's work
    directory, or, for nodes that do not share it (an enabled `mirror`), the store's copy, where the stage's task
    publishes it. It pickles (it travels to the workers). `poller(rank)` gives a check to call every step: the
    local marker each call; the store at most every `every_s` and from rank 0 only (one request, not one per rank
    and step); the caller then shares the answer with the other ranks."""

    out_dir: str
    mirror: NodeMirror = field(default_factory=NodeMirror)
    every_s: float = 5.0

    def poller(self, rank: int) -> Callable[[], bool]:
        remote = self.mirror if rank == 0 and self.mirror.enabled else None
        last = [0.0]

        def requested() -> bool:
            if stop_requested(Path(self.out_dir)):
                return True
            if remote is None or time.monotonic() - last[0] < self.every_s:
                return False
            last[0] = time.monotonic()
            return remote.exists(STOP_REQUEST)

        return requested


@contextlib.contextmanager
def stop_on_sigterm(out_dir: Path, stage: str, mirror: NodeMirror | None = None) -> Iterator[None]:
    """While the block runs, SIGTERM writes STOP_REQUEST into `out_dir` instead of ending the process (the stage,
    and every worker it started that sees `out_dir`, then checkpoints and stops); with an enabled `mirror` it is
    also written to the store's copy, for workers on nodes that do not share `out_dir`. Python runs signal handlers
    on the main thread only; elsewhere SIGTERM keeps its usual effect."""
    marker = Path(out_dir) / STOP_REQUEST
    shared = mirror if mirror is not None and mirror.enabled else None

    def withdraw() -> None:  # a request an earlier attempt already answered, or this one's once the block ends
        marker.unlink(missing_ok=True)
        if shared is not None:
            shared.delete(STOP_REQUEST)

    withdraw()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        marker.touch()
        if shared is not None:
            shared.push([STOP_REQUEST])
        print(f"[{stage}] SIGTERM: checkpointing and stopping after the current step", flush=True)

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        withdraw()


def serial_map(fn: Callable[[Any], Any], items: Sequence[Any], desc: str = "") -> list[Any]:
    """The fan-out a stage gets when it runs outside the pipeline: one item after another, in this process."""
    return [fn(item) for item in items]


@dataclass
class StageContext:
    """What a running stage may know about its execution besides its config, inputs and output directory.

    `progress(total, desc)` reports a long step's progress (see `pipeline/progress.py`).
    `map(fn, items, desc)` is how a data stage fans out: `fn` (a module-level function) is applied to every item
    and the results come back in order. Under the runner each call is a Ray task on `resources.cpus_per_worker`
    CPUs with at most `resources.num_workers` in flight; standalone it is a plain loop. The stage never sees Ray.
    `mirror` is how workers a stage starts on other nodes reach its work directory and inputs (disabled when the
    store is a shared filesystem, and standalone).
    `run_workers(fn, arg, out_dir)` is how a training stage starts its group: `fn(arg)` on `resources.num_workers`
    Ray Train workers with a torch process group among them (see `pipeline/workers.py`).
    Files a stage needs only until its artifact commits (checkpoints) go under `transient(out_dir)`: the commit
    leaves them out of the artifact and deletes them once the artifact is in place.
    """

    stage: str
    version: str = "standalone"
    run_id: str = "standalone"
    resumed: bool = False
    resources: StageResources = field(default_factory=StageResources)
    quiet: bool = False
    progress: Progress = field(default_factory=Progress)  # `ctx.progress(total, desc)`: a bar, lines, or nothing
    log: Callable[[Mapping[str, Any], int | None], None] = lambda metrics, step=None: None
    save_partial: Callable[[], None] = lambda: None
    map: Callable[..., list[Any]] = serial_map
    mirror: NodeMirror = field(default_factory=NodeMirror)  # the work directory and inputs from other nodes

    def run_workers(self, fn: Callable[[Any], None], arg: Any, out_dir: Path) -> None:
        from pipeline.workers import run_worker_group

        run_worker_group(fn, arg, out_dir, self)

    def stop_signal(self, out_dir: Path) -> StopSignal:
        return StopSignal(str(out_dir), self.mirror)

    @staticmethod
    def transient(out_dir: Path) -> Path:
        return Path(out_dir) / TRANSIENT


StageFn = Callable[[Any, dict[str, Path], Path, StageContext], Mapping[str, Any] | None]


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a plain config tree (None where it is absent)."""
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def holds(found: Any, value: Any) -> bool:
    """Whether a config value `found` satisfies a condition's `value`: it is that value, or a list holding it."""
    return found == value or (isinstance(found, list | tuple) and value in found)


@dataclass(frozen=True)
class StageChoice:
    """A top-level config key naming any of a set of alternative stages, one (`alignment=dpo`) or several
    (`alignment=[ppo,dpo]`); `default` when the config does not say. A stage that takes whichever are chosen lists
    `inputs()` among its inputs: one slot per option, filled (under the option's name) when the config names it,
    absent otherwise, so a run builds only the chosen ones. Another option is one more name in `options`."""

    key: str
    options: tuple[str, ...]
    default: tuple[str, ...]

    def inputs(self) -> tuple[InputChoice, ...]:
        return tuple(InputChoice(stage, None, (({self.key: stage}, stage),), choice=self) for stage in self.options)

    def problems(self, value: Any) -> list[str]:
        """What is wrong with a config's value for this key (an unknown option, or not a name or list of names)."""
        names = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(n, str) for n in names):
            return [f"must be one of {', '.join(self.options)} or a list of them, got {value!r}"]
        return [f"unknown choice {n!r}; choose from {', '.join(self.options)}" for n in names if n not in self.options]


@dataclass(frozen=True)
class InputChoice:
    """An input whose producing stage the config picks. `cases` are (condition, stage) pairs tried in order: a
    condition maps dotted config keys to values and holds when the config has them all (see `holds`); the first
    that holds picks its stage, None meaning no input in this slot; when none holds, `default` does. The stage
    finds the chosen artifact in its inputs under `slot`. `choice`: the StageChoice whose key the cases read, if
    any (its key then joins the config schema)."""

    slot: str
    default: str | None
    cases: tuple[tuple[Mapping[str, Any], str | None], ...] = ()
    choice: StageChoice | None = None

    def stages(self) -> list[str]:
        return [s for s in dict.fromkeys((self.default, *(stage for _, stage in self.cases))) if s is not None]

    def chosen(self, config: Mapping[str, Any]) -> str | None:
        for condition, stage in self.cases:
            if all(holds(config_value(config, key), value) for key, value in condition.items()):
                return stage
        return self.default


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: StageFn
    config_class: type
    inputs: tuple[str | InputChoice, ...] = ()
    config_key: str = ""  # defaults to the stage name
    version: int = 1
    resources: StageResources = field(default_factory=StageResources)
    starts_workers: bool = False
    stops_on_request: bool = False  # honours STOP_REQUEST (see stop_on_sigterm): checkpoints, raises StageStopped
    # What the run report shows of an artifact: `report(artifact_dir) -> [section, ...]`, plain data that
    # `pipeline/report.py` draws (line charts, grouped bars, tables).
    report: Callable[[Path], list[dict[str, Any]]] | None = None
    # What the output is a function of when the config only names it: `identity(config subtree)` is hashed into
    # the version instead of the subtree (and may raise a GptlineError for bad input, before anything runs).
    identity: Callable[[Any], Any] | None = None

    @property
    def key(self) -> str:
        return self.config_key or self.name

    def possible_inputs(self) -> list[str]:
        """Every stage that can fill one of this stage's inputs, under any config, in declaration order."""
        return list(dict.fromkeys(stage for i in self.inputs for stage in ([i] if isinstance(i, str) else i.stages())))

    def slots(self, config: Mapping[str, Any]) -> dict[str, str]:
        """Slot -> the stage that fills it under this config (a plain input is its own slot)."""
        found = {}
        for item in self.inputs:
            if isinstance(item, str):
                found[item] = item
            elif (stage := item.chosen(config)) is not None:
                found[item.slot] = stage
        return found

    def identity_of(self, subtree: Any) -> Any:
        """What is hashed into the version for this config subtree: `identity`'s answer, or the subtree less its
        unversioned fields."""
        return self.identity(subtree) if self.identity is not None else split(self.config_class, subtree)[0]

    def unversioned(self, subtree: Any) -> dict[str, Any]:
        """The values of the subtree's unversioned fields (recorded in the manifest, never hashed)."""
        return split(self.config_class, subtree)[1]

    def input_stages(self, config: Mapping[str, Any]) -> list[str]:
        """The stages this stage takes input from under this config, each once, in declaration order."""
        return list(dict.fromkeys(self.slots(config).values()))


def stage_choices(specs: Iterable[StageSpec]) -> list[StageChoice]:
    """The StageChoices the specs' inputs read, each once: their keys are config keys of their own."""
    found = [i.choice for spec in specs for i in spec.inputs if isinstance(i, InputChoice) and i.choice is not None]
    return list(dict.fromkeys(found))


def load_registry(ref: str) -> list[StageSpec]:
    """Import 'package.module:ATTRIBUTE', a list of StageSpec."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise DagError(f"registry {ref!r} must look like 'module:ATTRIBUTE'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DagError(f"cannot import stage registry module {module_name!r}: {e}") from e
    try:
        specs = getattr(module, attr)
    except AttributeError as e:
        raise DagError(f"module {module_name!r} has no stage registry {attr!r}") from e
    return list(specs)


class DAG:
    """The validated stage graph, in topological order (ties broken by registration order)."""

    def __init__(self, specs: Iterable[StageSpec]):
        self.specs: dict[str, StageSpec] = {}
        for spec in specs:
            if not NAME_RE.match(spec.name) or spec.name == RUNS_DIR:
                raise DagError(f"invalid stage name {spec.name!r}: lowercase letters, digits, '_'; not 'runs'")
            if spec.name in self.specs:
                raise DagError(f"stage {spec.name!r} is registered twice")
            self.specs[spec.name] = spec
        for spec in self.specs.values():
            for name in spec.possible_inputs():
                if name not in self.specs:
                    raise DagError(f"stage {spec.name!r} takes input {name!r}, which is not a registered stage")
        self.order = self._toposort()

    def _toposort(self) -> list[str]:
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                cycle = [*path[path.index(name) :], name]
                raise DagError("the stage graph has a cycle: " + " -> ".join(cycle))
            state[name] = "visiting"
            for dep in self.specs[name].possible_inputs():
                visit(dep, [*path, name])
            state[name] = "done"
            order.append(name)

        for name in self.specs:
            visit(name, [])
        return order

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def check_known(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.specs:
                known = ", ".join(self.order) or "(none registered)"
                raise DagError(f"unknown stage {name!r}; known stages: {known}")

    def ancestors(self, name: str, config: Mapping[str, Any]) -> set[str]:
        """The stages `name` needs under this config, directly or through others."""
        found: set[str] = set()
        stack = self.specs[name].input_stages(config)
        while stack:
            dep = stack.pop()
            if dep not in found:
                found.add(dep)
                stack.extend(self.specs[dep].input_stages(config))
        return found

    def ends(self) -> list[str]:
        """The stages no stage can take as input, under any config."""
        consumed = set().union(*(spec.possible_inputs() for spec in self.specs.values()))
        return [name for name in self.order if name not in consumed]

    def select(self, until: Iterable[str] = (), only: Iterable[str] = (),
               config: Mapping[str, Any] | None = None) -> list[str]:  # fmt: skip
        """The stages to execute, in order: the graph's ends and what they need (everything); or the named stages
        plus what they need (`until`); or exactly the named stages (`only`), whose inputs must then already be
        committed. What a stage needs follows the inputs `config` chooses."""
        until, only = list(until), list(only)
        self.check_known(until + only)
        if until and only:
            raise DagError("choose either --until or --only, not both")
        config = config or {}
        if only:
            chosen = set(only)
        else:
            targets = until or self.ends()
            chosen = set(targets).union(*(self.ancestors(n, config) for n in targets))
        return [name for name in self.order if name in chosen]

    def versions(self, configs: Mapping[str, Any], stages: Iterable[str] | None = None) -> dict[str, str]:
        """The artifact version of each of `stages` (default: every stage the config's ends need) and of what they
        need, from the resolved config subtrees keyed by config key."""
        wanted = set(self.select(config=configs) if stages is None else stages)
        wanted |= set().union(*(self.ancestors(name, configs) for name in wanted))
        versions: dict[str, str] = {}
        for name in self.order:
            if name not in wanted:
                continue
            spec = self.specs[name]
            inputs = {dep: versions[dep] for dep in spec.input_stages(configs)}
            versions[name] = artifact_version(name, spec.version, spec.identity_of(configs.get(spec.key)), inputs)
        return versions
