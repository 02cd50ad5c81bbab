"""The check behind every unversioned config field: two runs that differ only in such fields write the same
artifact files, byte for byte (the training log and final metrics aside)."""

from __future__ import annotations

from pathlib import Path

from gptline.training.log import FINAL, LOG
from pipeline.artifacts import artifact_files, sha256_file

MEASUREMENTS = {LOG, FINAL}  # what the measuring fields are allowed to change


def assert_identical_artifacts(a: Path, b: Path) -> None:
    digests = [{rel: sha256_file(d / rel) for rel in artifact_files(d) if rel not in MEASUREMENTS} for d in (a, b)]
    assert digests[0].keys() == digests[1].keys()
    assert [rel for rel in digests[0] if digests[0][rel] != digests[1][rel]] == []
    assert any(rel.endswith(".safetensors") for rel in digests[0])
