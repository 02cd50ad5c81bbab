"""Checkpoints of a training stage's engines, complete or absent, with every rank's RNG state as plain data.

Layout under the checkpoint directory (the stage's transient directory, which never becomes part of the artifact):
`<engine>/step-<n>/` is DeepSpeed's checkpoint of each named engine at step n (pretrain has one engine, ppo a
policy and a value model), and `latest` names the newest step saved by every engine on every rank. It is written
last, so a crash in the middle of a save leaves the previous checkpoint the one that loads. The newest `keep` steps
are kept.

With an enabled `mirror` (an object store; workers on several nodes, each with its own copy of the directory) the
store's copy is the one that counts: after each save every rank uploads the files it wrote, and once all have (a
barrier) rank 0 uploads `latest` and prunes old steps there. Loading reads `latest` from the store and downloads
what this rank reads: the shared files and its own partition, never the other ranks' optimizer states.
`download_all` fetches one engine's whole checkpoint (rank 0 does, to consolidate ZeRO-3 weights).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gptline.training.collectives import barrier

LATEST = "latest"


class Mirror(Protocol):
    """Where checkpoints live when nodes share no filesystem (the pipeline's NodeMirror); paths are relative to
    `workdir`."""

    workdir: str

    @property
    def enabled(self) -> bool: ...
    def push(self, rels: list[str]) -> None: ...
    def pull(self, rels: list[str]) -> None: ...
    def list(self, rel: str = "", recursive: bool = True) -> list[str]: ...
    def read_text(self, rel: str) -> str | None: ...
    def delete(self, rel: str) -> None: ...


def rng_state() -> dict[str, Any]:
    """Every generator's state as plain data (numpy's key array as a list), loadable with weights_only=True."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, keys.tolist(), int(position), int(has_gauss), float(gauss)]
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def gather_rng(world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, so a resumed rank continues its own stream (all ranks hold the full list)."""
    if world_size == 1:
        return [rng_state()]
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def checkpoint_file_rank(name: str) -> int | None:
    """The rank that writes a DeepSpeed checkpoint file (its ZeRO partition: `zero_pp_rank_<r>_...`), or None for
    the files rank 0 writes for everyone (`mp_rank_00_model_states.pt` under ZeRO-1/2, `zero_to_fp32.py`)."""
    match = re.search(r"zero_pp_rank_(\d+)_", name)
    return int(match.group(1)) if match else None


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


class Checkpoints:
    """The checkpoints of one worker's engines (see the module docstring)."""

    def __init__(self, directory: Path, keep: int, mirror: Mirror | None, rank: int):
        self.directory, self.keep, self.rank = directory, keep, rank
        self.mirror = mirror if mirror is not None and mirror.enabled else None
        self.rel = os.path.relpath(directory, self.mirror.workdir) if self.mirror else ""

    def latest(self) -> str | None:
        if self.mirror:
            text = self.mirror.read_text(f"{self.rel}/{LATEST}")
            return text.strip() if text else None
        marker = self.directory / LATEST
        return marker.read_text().strip() if marker.exists() else None

    def save(self, engines: dict[str, Any], step: int, client_state: dict[str, Any], with_files: list[str]) -> None:
        """Every engine's state at `step` (the client state rides with the first), then `latest` once all ranks
        have written (and, with a mirror, uploaded) their parts. With a mirror rank 0 uploads `with_files` (work
        directory files that must match the checkpoint, such as the log) before `latest`."""
        tag = step_tag(step)
        for i, (name, engine) in enumerate(engines.items()):
            engine.save_checkpoint(str(self.directory / name), tag=tag, client_state=client_state if i == 0 else {},
                                   save_latest=False)  # fmt: skip
            if self.mirror:
                writers = {f: checkpoint_file_rank(f) for f in sorted(os.listdir(self.directory / name / tag))}
                mine = [
                    f for f, writer in writers.items() if writer == self.rank or (writer is None and self.rank == 0)
                ]
                self.mirror.push([f"{self.rel}/{name}/{tag}/{f}" for f in mine])
        barrier()
        if self.rank == 0:
            marker = self.directory / LATEST
            marker.with_name(LATEST + ".tmp").write_text(tag)
            os.replace(marker.with_name(LATEST + ".tmp"), marker)
            if self.mirror:
                self.mirror.push([*with_files, f"{self.rel}/{LATEST}"])
                self._prune_remote(engines)
        if self.rank == 0 or self.mirror:  # with a mirror every node prunes its own copy
            for name in engines:
                tags = sorted(p.name for p in (self.directory / name).glob("step-*") if p.is_dir())
                for old in tags[: -self.keep]:
                    shutil.rmtree(self.directory / name / old, ignore_errors=True)

    def _prune_remote(self, engines: dict[str, Any]) -> None:
        for name in engines:
            remote_tags = [Path(rel).name for rel in self.mirror.list(f"{self.rel}/{name}", recursive=False)]
            for old in sorted(t for t in remote_tags if t.startswith("step-"))[: -self.keep]:
                self.mirror.delete(f"{self.rel}/{name}/{old}")

    def load(self, engines: dict[str, Any]) -> dict[str, Any] | None:
        """Every engine restored from the newest complete checkpoint; its client state, or None when there is none."""
        tag = self.latest()
        if tag is None:
            return None
        client_state: dict[str, Any] = {}
        for i, (name, engine) in enumerate(engines.items()):
            if self.mirror:
                self.download(name, tag, self.rank)
            _, state = engine.load_checkpoint(str(self.directory / name), tag=tag)
            if i == 0:
                client_state = state
        return client_state

    def download_all(self, name: str) -> str | None:
        """The newest checkpoint's tag, every rank's files of engine `name` fetched first (with a mirror)."""
        tag = self.latest()
        if self.mirror and tag is not None:
            self.download(name, tag, None)
        return tag

    def download(self, name: str, tag: str, rank: int | None) -> None:
        """The files of engine `name`'s checkpoint `tag` that `rank` reads: the shared ones and its own partition
        (every file when `rank` is None), fetched again even when present (a rollback may have rewritten them)."""
        files = self.mirror.list(f"{self.rel}/{name}/{tag}")
        wanted = [rel for rel in files if rank is None or checkpoint_file_rank(Path(rel).name) in (None, rank)]
        self.mirror.pull(wanted)
