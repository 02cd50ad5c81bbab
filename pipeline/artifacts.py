"""The artifact store: versioned, atomically committed, checksum-verified stage outputs.

Layout under the store root (a local directory, or any `pyarrow.fs` URI such as s3://, gs://, hdfs://):

    <root>/<stage>/<version>.partial/   work in progress; `transient/` inside it holds what the stage needs only
                                        until the commit (a training stage's checkpoints)
    <root>/<stage>/<version>/           a committed artifact: outputs plus manifest.json, written last
    <root>/<stage>/<version>.lock       lease held by the one process building that version
    <root>/runs/<run_id>/               run records (see pipeline.runner)

An artifact's version is a short hash of (stage name, stage VERSION, the stage's resolved config subtree less its
unversioned fields, input versions) and nothing else, so resources, cluster addresses and other stages' settings never change it.

Commit is atomic. On a local (or NFS) filesystem the manifest is written into the partial directory and the
directory renamed into place. Object stores have no directory rename, so there the files are copied to the final
prefix and the manifest is written last: on every filesystem "committed" means "has a manifest", and a reader
never sees a directory without one as an artifact. The partial directory's `transient/` is never part of the
artifact: it is deleted only once the artifact is in place (so a crash before then still resumes from it), and a
leftover one found beside a committed artifact (a crash between the two) is deleted when the artifact is next used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import CorruptArtifactError, StoreError
from pipeline.redact import redact_strings, redact_text

MANIFEST = "manifest.json"
PARTIAL = ".partial"
TRANSIENT = "transient"  # in a work directory: kept until the commit, never part of the artifact
LOCK = ".lock"
WRITER = "writer.json"  # object stores: which Ray cluster writes the store (Store.claim_writer)
RUNS_DIR = "runs"
VERSION_CHARS = 12
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
VERSION_RE = re.compile(rf"^[0-9a-f]{{{VERSION_CHARS}}}$")
HASH_CHUNK = 1 << 20


def check_name(kind: str, name: str) -> str:
    """Names become path components: only [a-z0-9_] so none can climb out of the store root."""
    if not NAME_RE.match(name):
        raise StoreError(f"invalid {kind} name {name!r}: use lowercase letters, digits and '_' only")
    return name


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def artifact_version(stage: str, stage_version: int, config: Any, inputs: dict[str, str]) -> str:
    """Short hash of exactly what determines a stage's output."""
    payload = {"stage": stage, "stage_version": stage_version, "config": config, "inputs": inputs}
    try:
        blob = canonical_json(payload)
    except (TypeError, ValueError) as e:
        raise StoreError(f"config of stage {stage!r} is not plain JSON data: {e}") from e
    return hashlib.sha256(blob.encode()).hexdigest()[:VERSION_CHARS]


def sha256_stream(stream: Any) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def code_revision() -> str:
    """The git commit of the code that built an artifact (provenance only, never part of its version)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the root path inside it, for a local path or any URI pyarrow understands."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as e:
        scheme = uri.split("://", 1)[0]
        raise StoreError(f"cannot open store {uri!r} (scheme {scheme!r}): {e}") from e


@dataclass(frozen=True)
class Artifact:
    """A committed artifact: where it is and what its manifest says."""

    stage: str
    version: str
    path: str  # inside the store's filesystem
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.version}"

    @property
    def inputs(self) -> dict[str, str]:
        return self.manifest.get("inputs", {})


def artifact_files(local_dir: Path) -> list[str]:
    """The files of a work directory that make up its artifact (relative paths): all but the transient ones."""
    files = (p.relative_to(local_dir).as_posix() for p in sorted(local_dir.rglob("*")) if p.is_file())
    return [rel for rel in files if rel != MANIFEST and rel.split("/")[0] != TRANSIENT]


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 over every file's path and sha256: equal for two builds exactly when all their files are (a
    version names what an artifact was made from; this, what it holds, which a live source can change)."""
    return hashlib.sha256(canonical_json({rel: f["sha256"] for rel, f in files.items()}).encode()).hexdigest()


def _file_listing(local_dir: Path) -> dict[str, dict[str, Any]]:
    return {rel: {"size": (local_dir / rel).stat().st_size, "sha256": sha256_file(local_dir / rel)}
            for rel in artifact_files(local_dir)}  # fmt: skip


class Store:
    """Artifacts and run records under one root on one pyarrow filesystem."""

    def __init__(self, root: str, filesystem: pafs.FileSystem | None = None):
        if filesystem is None:
            self.fs, self.root = open_filesystem(root)
        else:
            self.fs, self.root = filesystem, root.rstrip("/")
        self.uri = redact_text(root if "://" in root or filesystem is not None else self.root)  # shown, never opened
        # Only a real local filesystem gets the rename commit and the lease-file lock; everything else is
        # treated as an object store.
        self.is_local = type(self.fs) is pafs.LocalFileSystem

    # ---- paths -------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def artifact_path(self, stage: str, version: str) -> str:
        return self.path(check_name("stage", stage), version)

    def partial_path(self, stage: str, version: str) -> str:
        return self.artifact_path(stage, version) + PARTIAL

    def _info(self, path: str) -> pafs.FileInfo:
        return self.fs.get_file_info(path)

    def exists(self, path: str) -> bool:
        return self._info(path).type != pafs.FileType.NotFound

    def check_writable(self) -> None:
        """Fail at start-up, not after an hour of training, when the store cannot be written."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"store root {self.uri!r} is not writable: {e}") from e

    # ---- small JSON and text files (manifests, run records) ---------------------------------------------
    def read_json(self, path: str) -> Any:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def write_json(self, path: str, obj: Any) -> None:
        """Every string redacted (pipeline.redact): no known secret reaches a manifest or a run record."""
        self.write_bytes(path, (json.dumps(redact_strings(obj), indent=2, sort_keys=True) + "\n").encode())

    def write_bytes(self, path: str, data: bytes) -> None:
        """Whole-file replace: readers see the old or the new content, never a torn one."""
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # object stores make a PUT visible atomically
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def list_dir(self, path: str) -> list[pafs.FileInfo]:
        if not self.exists(path):
            return []
        return self.fs.get_file_info(pafs.FileSelector(path, recursive=False))

    # ---- reading artifacts ---------------------------------------------------------------------------------
    def is_committed(self, stage: str, version: str) -> bool:
        return self.exists(self.artifact_path(stage, version) + "/" + MANIFEST)

    def has_partial(self, stage: str, version: str) -> bool:
        return self.exists(self.partial_path(stage, version))

    def load(self, stage: str, version: str, verify: str = "size") -> Artifact:
        """A committed artifact, checked against its manifest ('size', 'full' sha256, or 'none')."""
        path = self.artifact_path(stage, version)
        manifest_path = path + "/" + MANIFEST
        if not self.exists(manifest_path):
            raise StoreError(f"artifact {stage}/{version} is not committed in {self.uri}")
        try:
            manifest = self.read_json(manifest_path)
        except (ValueError, OSError) as e:
            raise CorruptArtifactError(f"unreadable manifest {manifest_path}: {e}") from e
        artifact = Artifact(stage, version, path, manifest)
        if verify != "none":
            self.verify(artifact, full=verify == "full")
        return artifact

    def verify(self, artifact: Artifact, full: bool) -> None:
        for rel, expected in artifact.manifest.get("files", {}).items():
            path = f"{artifact.path}/{rel}"
            info = self._info(path)
            if info.type == pafs.FileType.NotFound:
                raise CorruptArtifactError(f"{path}: missing (listed in the manifest of {artifact.ref})")
            if info.size != expected["size"]:
                raise CorruptArtifactError(
                    f"{path}: size {info.size} bytes, manifest of {artifact.ref} says {expected['size']}"
                )
            if full and self._sha256(path) != expected["sha256"]:
                raise CorruptArtifactError(
                    f"{path}: sha256 does not match the manifest of {artifact.ref} (the file is corrupted)"
                )

    def _sha256(self, path: str) -> str:
        if self.is_local:
            return sha256_file(path)
        with self.fs.open_input_stream(path) as f:
            return sha256_stream(f)

    def stages(self) -> list[str]:
        return sorted(
            i.base_name
            for i in self.list_dir(self.root)
            if i.type == pafs.FileType.Directory and NAME_RE.match(i.base_name) and i.base_name != RUNS_DIR
        )

    def list(self, stage: str | None = None) -> list[Artifact]:
        """Every committed artifact (of one stage, or all), oldest first."""
        found = []
        for name in [stage] if stage else self.stages():
            for info in self.list_dir(self.path(name)):
                is_version = info.type == pafs.FileType.Directory and VERSION_RE.match(info.base_name)
                if is_version and self.is_committed(name, info.base_name):
                    found.append(self.load(name, info.base_name, verify="none"))
        return sorted(found, key=lambda a: (a.manifest.get("timings", {}).get("end", 0), a.ref))

    def uncommitted(self) -> list[str]:
        """Paths of partial directories and of final directories left without a manifest (torn commits)."""
        paths = []
        for name in self.stages():
            for info in self.list_dir(self.path(name)):
                if info.type != pafs.FileType.Directory:
                    continue
                if info.base_name.endswith(PARTIAL) or (
                    VERSION_RE.match(info.base_name) and not self.is_committed(name, info.base_name)
                ):
                    paths.append(info.path)
        return paths

    def find(self, ref: str) -> Artifact:
        """Resolve 'stage/version' or 'stage/version-prefix' (or a unique version prefix alone)."""
        stage, _, prefix = ref.rpartition("/")
        candidates = [a for a in self.list(stage or None) if a.version.startswith(prefix)]
        if not candidates:
            raise StoreError(f"no committed artifact matches {ref!r} in {self.uri}")
        if len(candidates) > 1:
            names = ", ".join(a.ref for a in candidates)
            raise StoreError(f"{ref!r} is ambiguous: {names}")
        return candidates[0]

    def lineage(self, stage: str, version: str) -> dict[str, Any]:
        """The tree of inputs an artifact was built from, down to the sources."""
        if not self.is_committed(stage, version):
            return {"ref": f"{stage}/{version}", "missing": True, "inputs": []}
        artifact = self.load(stage, version, verify="none")
        return {
            "ref": artifact.ref,
            "inputs": [self.lineage(s, v) for s, v in sorted(artifact.inputs.items())],
        }

    def delete(self, path: str) -> None:
        _delete(self.fs, path)

    # ---- building artifacts --------------------------------------------------------------------------------
    def open_workdir(self, stage: str, version: str, scratch: Path) -> tuple[Path, bool]:
        """The local directory a stage writes into, and whether it holds earlier partial work to resume.

        Local stores hand out the partial directory itself. For object stores the partial work is mirrored
        into `scratch` (checkpoints there are uploaded by `save_partial`).
        """
        if self.is_local:
            workdir = Path(self.partial_path(stage, version))
            resumed = workdir.is_dir() and any(workdir.iterdir())
            workdir.mkdir(parents=True, exist_ok=True)
            return workdir, resumed
        workdir = scratch / stage / (version + PARTIAL)
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        resumed = self.has_partial(stage, version)
        if resumed:
            pafs.copy_files(self.partial_path(stage, version), str(workdir), source_filesystem=self.fs)
        return workdir, resumed

    def save_partial(self, stage: str, version: str, workdir: Path) -> None:
        """Object stores: upload a stage's partial work so another node can resume it. Local: nothing to do. The
        transient files are not uploaded here: the workers that write them keep the store's copy current."""
        if not self.is_local:
            self._upload(workdir, self.partial_path(stage, version))

    def _upload(self, local_dir: Path, path: str) -> None:
        """The work directory's artifact files (not its transient ones) to `path`."""
        self.fs.create_dir(path, recursive=True)
        for rel in artifact_files(local_dir):
            self.fs.create_dir(f"{path}/{rel}".rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(local_dir / rel), f"{path}/{rel}", destination_filesystem=self.fs)

    def drop_transient(self, stage: str, version: str) -> None:
        """Delete a committed artifact's leftover transient directory (a crash between commit and cleanup)."""
        leftover = f"{self.artifact_path(stage, version)}/{TRANSIENT}"
        if self.exists(leftover):
            self.delete(leftover)

    def localize(self, artifact: Artifact, scratch: Path, max_file_bytes: int | None = None) -> Path:
        """A local directory holding the artifact's files (the artifact itself on a local store). With
        `max_file_bytes`, only the files up to that size are fetched from an object store (what a report reads:
        stats and logs, not corpora, shards or weights)."""
        if self.is_local:
            return Path(artifact.path)
        if max_file_bytes is None:
            local = scratch / "inputs" / artifact.stage / artifact.version
            _download_dir(self.fs, artifact.path, local)
            return local
        local = scratch / "small" / artifact.stage / artifact.version
        files = artifact.manifest.get("files", {})
        for rel in sorted(rel for rel, f in files.items() if f["size"] <= max_file_bytes):
            target = local / rel
            if not target.exists() or target.stat().st_size != files[rel]["size"]:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
                pafs.copy_files(f"{artifact.path}/{rel}", str(tmp), source_filesystem=self.fs)
                os.replace(tmp, target)
        return local

    def mirror(self, stage: str, version: str, workdir: Path, inputs: dict[Path, Artifact]) -> NodeMirror:
        """How a stage's workers on other nodes reach its work directory and inputs (see NodeMirror)."""
        if self.is_local:
            return NodeMirror(str(workdir))
        pairs = tuple((str(local), artifact.path) for local, artifact in inputs.items())
        return NodeMirror(str(workdir), self.fs, self.partial_path(stage, version), pairs)

    def commit(self, stage: str, version: str, workdir: Path, manifest: dict[str, Any]) -> Artifact:
        """Checksum every output, write the manifest last, and make the artifact visible atomically."""
        from pipeline.faults import fault_point

        files = _file_listing(workdir)
        manifest = {
            **manifest,
            "stage": stage,
            "version": version,
            "files": files,
            "content": content_hash(files),
            "code_revision": code_revision(),
            "host": socket.gethostname(),
        }
        final = self.artifact_path(stage, version)
        if self.is_committed(stage, version):
            raise StoreError(f"{stage}/{version} is already committed; refusing to overwrite it")
        if self.exists(final):  # a torn commit from an earlier crash (object stores only)
            self.fs.delete_dir(final)
        fault_point(f"commit.{stage}.before_manifest")
        if self.is_local:
            _fsync_tree(workdir)  # after a power loss a committed artifact holds whole files, never torn ones
            self.write_json(str(workdir / MANIFEST), manifest)
            fault_point(f"commit.{stage}.before_rename")
            os.rename(workdir, final)
            _fsync_dir(Path(final).parent)
        else:
            self._upload(workdir, final)
            fault_point(f"commit.{stage}.before_rename")
            self.write_json(f"{final}/{MANIFEST}", manifest)
        fault_point(f"commit.{stage}.before_cleanup")
        if self.is_local:
            shutil.rmtree(Path(final) / TRANSIENT, ignore_errors=True)
        elif self.has_partial(stage, version):
            self.fs.delete_dir(self.partial_path(stage, version))
        return Artifact(stage, version, final, manifest)

    def retire(self, stage: str, version: str) -> None:
        """Take a committed artifact out of the store (to rebuild it: `gptline run --rebuild STAGE`). It stops
        being visible first (renamed aside, or its manifest deleted), then its files go."""
        final = self.artifact_path(stage, version)
        if self.is_local:
            aside = f"{final}.retired-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            self.fs.delete_file(f"{final}/{MANIFEST}")
            self.fs.delete_dir(final)

    # ---- one builder per artifact ---------------------------------------------------------------------------
    def _lease(self, path: str, ttl_s: float, heartbeat_s: float = 1.0) -> LeaseFile:
        return (
            LeaseFile(Path(path), ttl_s, heartbeat_s) if self.is_local else LeaseFile(path, ttl_s, heartbeat_s, self.fs)
        )

    @contextlib.contextmanager
    def lock(self, stage: str, version: str, ttl_s: float, heartbeat_s: float) -> Iterator[None]:
        """Hold the build lease of one artifact version, stored beside it; waits while another live process holds
        it. On an object store the drivers of one cluster take turns first (the runner's Ray lock table)."""
        lease = self._lease(self.artifact_path(stage, version) + LOCK, ttl_s, heartbeat_s)
        lease.acquire()
        try:
            yield
        finally:
            lease.release()

    def leases(self, ttl_s: float) -> dict[str, bool]:
        """Every lease in the store: its artifact path (without the .lock suffix) and whether a live process holds
        it (a heartbeat within `ttl_s`)."""
        found: dict[str, bool] = {}
        for name in self.stages():
            for info in self.list_dir(self.path(name)):
                if info.base_name.endswith(LOCK):
                    lease = self._lease(info.path, ttl_s)
                    found[info.path[: -len(LOCK)]] = not lease.is_stale(lease.read())
        return found

    def age_s(self, path: str) -> float:
        """Seconds since anything under `path` was last written."""
        infos = [self._info(path)]
        if infos[0].type == pafs.FileType.Directory:
            infos += self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        times = [i.mtime.timestamp() for i in infos if i.mtime is not None]
        return time.time() - max(times) if times else 0.0

    def claim_writer(self, cluster: str, ttl_s: float) -> None:
        """The single-writer rule of object stores, checked when a run starts: a store that another cluster (any
        other Ray than this driver's) wrote within `ttl_s` is refused, since without a conditional create two
        clusters' build leases cannot exclude each other. The claim is renewed by each lease heartbeat of this
        cluster's builds (`renew_writer`). Local stores need no rule: their leases are created with O_EXCL."""
        if self.is_local:
            return
        lease = self._lease(self.path(WRITER), ttl_s)
        record = lease.read()
        if record is not None and record.get("cluster") != cluster and not lease.is_stale(record):
            age = time.time() - record.get("heartbeat", 0)
            raise StoreError(
                f"store {self.uri} is being written by another Ray cluster ({record.get('cluster')}, on "
                f"{record.get('host', '?')}, {age:.0f} s ago): an object store is written by one cluster at a "
                f"time; run there, or wait {ttl_s:.0f} s after it stops"
            )
        self.renew_writer(cluster)

    def renew_writer(self, cluster: str) -> None:
        if not self.is_local:
            record = {"cluster": cluster, "host": socket.gethostname(), "heartbeat": time.time()}
            self.write_bytes(self.path(WRITER), json.dumps(record).encode())

    def release_writer(self, cluster: str) -> None:
        """A run of `cluster` ended: the store is free for another cluster (this cluster's other drivers, if any,
        claim it again with their next renewal)."""
        if not self.is_local:
            record = self._lease(self.path(WRITER), ttl_s=0).read()
            if record is not None and record.get("cluster") == cluster:
                _delete(self.fs, self.path(WRITER))


def _delete(fs: pafs.FileSystem, path: str) -> None:
    """Remove a directory or a file (nothing if it is not there)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def _download_dir(fs: pafs.FileSystem, remote: str, local: Path) -> None:
    """Copy a committed directory (one with a manifest) to `local` unless it is already there. Processes of one
    node take turns (a lock file beside it): the first downloads, the others then find it there."""
    if (local / MANIFEST).exists():
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.with_name(local.name + ".download-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (local / MANIFEST).exists():
            return
        tmp = local.with_name(local.name + f".tmp-{uuid.uuid4().hex}")
        tmp.mkdir()
        pafs.copy_files(remote, str(tmp), source_filesystem=fs)
        if local.exists():  # a torn earlier copy
            shutil.rmtree(local)
        tmp.rename(local)


@dataclass(frozen=True)
class NodeMirror:
    """A stage's directories as seen from another node of the cluster, for a store that is not a shared filesystem.

    A training stage's workers may run on other nodes than its own task. With a local (or NFS) store they share the
    store's partial directory and the input artifacts, and this mirror is disabled. With an object store each node
    has its own scratch copy at the same path: `pull_inputs()` downloads the stage's input artifacts there,
    `push(rels)` uploads files of the work directory (paths relative to it) to the stage's partial directory in the
    store, `pull(rels)` downloads them, `read_text`, `exists` and `list` look at the store's copy, `delete`
    removes a file or directory there. Uploads are single PUTs (atomic); downloads land under a temporary name and are renamed, so
    ranks sharing a node never read a half-written file. The object pickles (it travels to Ray Train workers)."""

    workdir: str = ""
    fs: pafs.FileSystem | None = None
    partial: str = ""
    inputs: tuple[tuple[str, str], ...] = ()  # (local directory, artifact path in the store)

    @property
    def enabled(self) -> bool:
        return self.fs is not None

    def _remote(self, rel: str) -> str:
        return f"{self.partial}/{rel}" if rel else self.partial

    def pull_inputs(self) -> None:
        for local, remote in self.inputs:
            _download_dir(self.fs, remote, Path(local))

    def list(self, rel: str = "", recursive: bool = True) -> list[str]:
        """Paths (relative to the work directory) of the files under `rel` in the store; directories too when not
        recursive."""
        remote = self._remote(rel)
        if self.fs.get_file_info(remote).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(remote, recursive=recursive))
        return sorted(i.path[len(self.partial) + 1 :] for i in infos if not recursive or i.type == pafs.FileType.File)

    def push(self, rels: list[str]) -> None:
        for rel in rels:
            parent = self._remote(rel).rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)
            with open(Path(self.workdir) / rel, "rb") as src, self.fs.open_output_stream(self._remote(rel)) as dst:
                shutil.copyfileobj(src, dst, HASH_CHUNK)

    def pull(self, rels: list[str]) -> None:
        for rel in rels:
            local = Path(self.workdir) / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex}")
            with self.fs.open_input_stream(self._remote(rel)) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, HASH_CHUNK)
            os.replace(tmp, local)

    def read_text(self, rel: str) -> str | None:
        try:
            with self.fs.open_input_stream(self._remote(rel)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._remote(rel)).type != pafs.FileType.NotFound

    def delete(self, rel: str) -> None:
        _delete(self.fs, self._remote(rel))


def _fsync_tree(local_dir: Path) -> None:
    """Flush the artifact files of a work directory, and its directories' entries, to disk."""
    files = artifact_files(local_dir)
    for rel in files:
        with open(local_dir / rel, "rb") as f:
            os.fsync(f.fileno())
    for directory in {(local_dir / rel).parent for rel in files} | {local_dir}:
        _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeaseFile:
    """An exclusive lease: a file beside the artifact holding its owner and a heartbeat a thread keeps fresh.

    On a local (or NFS) filesystem it is created with O_EXCL. pyarrow offers object stores no conditional create
    (S3's If-None-Match), so there it is created once none is live: one Ray cluster's lock table makes that
    exclusive among its drivers, and the single-writer rule (`Store.claim_writer`, checked at start-up) keeps a
    second cluster off the store. A lease is stale when its heartbeat is older than the TTL, or at once when its
    holder was a process on this host that no longer exists (a crashed stage must not make `resume` wait a whole
    TTL). An empty or torn lease (a crash just after the create) is as old as its last write. A stale lease is
    broken by renaming it away (locally, which only one contender can do) or deleting it.
    """

    POLL_S = 0.2

    def __init__(self, path: Path | str, ttl_s: float, heartbeat_s: float, fs: pafs.FileSystem | None = None):
        self.path, self.ttl_s, self.heartbeat_s = Path(path) if fs is None else path, ttl_s, heartbeat_s
        self.fs = fs  # None: the local filesystem, with O_EXCL and rename
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        record = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
        }
        return json.dumps(record).encode()

    def _read_bytes(self) -> bytes:
        if self.fs is None:
            return self.path.read_bytes()
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def _mtime(self) -> float:
        if self.fs is None:
            return self.path.stat().st_mtime
        mtime = self.fs.get_file_info(self.path).mtime
        if mtime is None:
            raise FileNotFoundError(self.path)
        return mtime.timestamp()

    def read(self) -> dict[str, Any] | None:
        try:
            data = self._read_bytes()
            try:
                return json.loads(data)
            except ValueError:  # being written, or left empty or torn by a crash: as old as its last write
                return {"heartbeat": self._mtime()}
        except FileNotFoundError:
            return None

    def is_stale(self, record: dict[str, Any] | None) -> bool:
        if record is None:
            return True
        if record.get("host") == socket.gethostname() and "pid" in record and not _pid_alive(record["pid"]):
            return True
        return time.time() - record.get("heartbeat", 0) > self.ttl_s

    def _create(self) -> bool:
        """Create the lease with this owner's record; False when one exists."""
        if self.fs is not None:
            if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
                return False
            self._write()
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
        return True

    def _write(self) -> None:
        if self.fs is None:
            tmp = self.path.with_name(f"{self.path.name}.beat-{self.owner}")
            tmp.write_bytes(self._record())
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(self._record())

    def acquire(self) -> None:
        if self.fs is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        while not self._create():
            record = self.read()
            if self.is_stale(record):
                self._break(record)
                continue
            time.sleep(self.POLL_S)
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.path}", daemon=True)
        self._thread.start()

    def _break(self, stale: dict[str, Any] | None) -> None:
        if self.fs is not None:
            if self.read() == stale:  # not refreshed meanwhile
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(self.path)
            return
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text() or "{}")
        except ValueError:
            moved = {}
        if stale is not None and moved.get("owner") != stale.get("owner"):
            # Between our read and the rename another process broke the stale lease and took a fresh one:
            # give it back (link fails if yet another lease already exists, which is then the live one).
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        os.remove(aside)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            record = self.read()
            if record is None or record.get("owner") != self.owner:
                return  # lost the lease (it was judged stale); the commit's rename still guards the artifact
            self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = self.read()
        if record is not None and record.get("owner") == self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path) if self.fs is None else self.fs.delete_file(self.path)
