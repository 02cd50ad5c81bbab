"""import: a Llama-architecture Hugging Face model, from a directory or an object-store URI, as an artifact that sft
(and pretrain, to continue pretraining) starts from instead of gptline's own tokenizer and pretrain stages.

Its config is the group `base_model`: `source: artifact` (the default: no import, the recipe as it was) or
`source: hf` with `path`. The checks and the conversion are `gptline/model/hf_import.py`'s. The artifact's version
is the sha256 of the files it reads (the spec's `identity`), so importing the same files twice, from anywhere, is
one artifact, and every check runs when the run is planned, before any stage starts. `source.json` records where
the files came from and their hashes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptline.model.hf_import import content_identity, import_model, inspect
from pipeline.config import typed
from pipeline.dag import StageContext

VERSION = 1
SOURCES = ("artifact", "hf")


@dataclass
class BaseModelConfig:
    source: str = "artifact"  # artifact: gptline's tokenizer and pretrain stages; hf: the model at `path`
    path: str = ""  # hf: a Hugging Face model directory or object-store URI (s3://..., gs://...)
    continue_pretraining: bool = False  # hf: pretrain continues the model on the corpus, and sft starts from that

    def validate(self) -> list[tuple[str, str]]:
        if self.source not in SOURCES:
            return [("source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")]
        if self.source == "hf" and not self.path:
            return [("path", "must name a Hugging Face model directory or URI when base_model.source is hf")]
        if self.continue_pretraining and self.source != "hf":
            return [("continue_pretraining", "continues an imported model: needs base_model.source=hf")]
        return []


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The sha256 of every file the import reads (after every check on them)."""
    return content_identity(typed(BaseModelConfig, config).path)


def run(cfg: BaseModelConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    plan = inspect(cfg.path)
    metrics = import_model(plan, out_dir)
    files = {file: plan.source.sha256(file) for file in plan.files}
    (out_dir / "source.json").write_text(json.dumps({"path": cfg.path, "files": files}, indent=2) + "\n")
    if not ctx.quiet:
        print(f"[import] {cfg.path}: {metrics['parameters']:,} parameters, {metrics['added_tokens']} tokens added",
              flush=True)  # fmt: skip
    return metrics
