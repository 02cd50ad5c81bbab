"""pretrain on a real Ray Train worker group with DeepSpeed on CPU: input checks, exact resume after a killed worker,
ZeRO-2 and ZeRO-3 (and their offload presets) across two workers against one worker."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file

from gptline.training.checkpoints import Checkpoints
from pipeline.artifacts import Store
from pipeline.config import typed
from pipeline.dag import StageContext, StageResources
from pipeline.errors import GptlineError
from stages import pretrain, tokenize, tokenizer
from tests.identical import assert_identical_artifacts
from tests.test_tokenizer import corpus, shakespeare_docs

SMALL = {
    "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, "multiple_of": 32},
    "steps": 8,
    "batch_size": 8,
    "eval_every": 4,
    "eval_batches": 2,
    "sample_every": 8,
    "sample_tokens": 8,
    "checkpoint_every": 4,
    "optim": {"lr": 3e-3, "warmup_steps": 2},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("pretrain-inputs"))


def build_inputs(tmp: Path) -> dict[str, Path]:
    """A real tokenizer and token shards from Shakespeare, built by the stages themselves."""
    tmp.mkdir(parents=True, exist_ok=True)
    docs = shakespeare_docs()[:600]
    source = corpus(tmp, docs)
    tok_dir, tokens_dir = tmp / "tokenizer", tmp / "tokenize"
    tok_dir.mkdir()
    tokens_dir.mkdir()
    tokenizer.run(
        typed(tokenizer.TokenizerConfig, {"vocab_size": 512}), {"crawl_mix": source}, tok_dir, StageContext("t")
    )
    tokenize.run(
        typed(tokenize.TokenizeConfig, {}), {"crawl_mix": source, "tokenizer": tok_dir}, tokens_dir, StageContext("t")
    )
    return {"tokenizer": tok_dir, "tokenize": tokens_dir}


def train(inputs, out: Path, workers: int, exist_ok: bool = False, **overrides) -> dict:
    out.mkdir(parents=True, exist_ok=exist_ok)
    cfg = typed(pretrain.PretrainConfig, {**SMALL, **overrides})
    ctx = StageContext("pretrain", resources=StageResources(num_workers=workers), quiet=True)
    return pretrain.run(cfg, inputs, out, ctx)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


# Every unversioned field of pretrain's config, changed from SMALL at once (tests/test_versioning.py checks the list).
UNVERSIONED_CHANGES = {"eval_every": 1, "eval_batches": 1, "sample_every": 1, "sample_tokens": 3, "keep_checkpoints": 1,
                       "sample_prompts": ["Once"], "peak_flops": 1e12}  # fmt: skip


def test_unversioned_fields_leave_the_artifact_unchanged(inputs, tmp_path, ray_session):
    base = {"steps": 4, "checkpoint_every": 2}
    train(inputs, tmp_path / "a", workers=1, **base)
    train(inputs, tmp_path / "b", workers=1, **base, **UNVERSIONED_CHANGES)
    assert len(losses(tmp_path / "b")) == 4 and "samples" in json.loads(
        (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()[0]
    )
    assert_identical_artifacts(tmp_path / "a", tmp_path / "b")


def test_bad_inputs_fail_before_training(inputs, tmp_path):
    with pytest.raises(GptlineError, match="pretrain.seq_len=64 is longer than pretrain.model.max_seq_len=32"):
        pretrain._check_inputs(
            typed(pretrain.PretrainConfig, {**SMALL, "seq_len": 64}), inputs["tokenize"], inputs["tokenizer"], 1
        )
    with pytest.raises(GptlineError, match="batch_size=8 is not divisible by 3 workers"):
        pretrain._check_inputs(typed(pretrain.PretrainConfig, SMALL), inputs["tokenize"], inputs["tokenizer"], 3)
    with pytest.raises(GptlineError, match="a global batch of 4 ranks x 20000 rows needs"):
        pretrain._check_inputs(
            typed(pretrain.PretrainConfig, {**SMALL, "batch_size": 80000}), inputs["tokenize"], inputs["tokenizer"], 4
        )
    small_vocab = tmp_path / "tok"
    small_vocab.mkdir()
    meta = json.loads((inputs["tokenizer"] / "tokenizer_meta.json").read_text())
    (small_vocab / "tokenizer_meta.json").write_text(json.dumps({**meta, "vocab_size": 50}))
    with pytest.raises(GptlineError, match="outside the tokenizer's vocabulary of 50"):
        pretrain._check_inputs(typed(pretrain.PretrainConfig, SMALL), inputs["tokenize"], small_vocab, 1)


@pytest.fixture(scope="module")
def two_workers(inputs, tmp_path_factory, ray_session) -> Path:
    """SMALL on two workers under the default ZeRO-2, uninterrupted and eager: the run the slow tests compare with."""
    out = tmp_path_factory.mktemp("two-workers") / "pretrain"
    train(inputs, out, workers=2)
    return out


@pytest.fixture(scope="module")
def one_worker(inputs, tmp_path_factory, ray_session) -> Path:
    """SMALL for 4 steps on one worker without ZeRO: the reference for every ZeRO preset on two workers."""
    out = tmp_path_factory.mktemp("one-worker") / "pretrain"
    train(inputs, out, workers=1, steps=4, deepspeed={"zero_stage": 0})
    return out


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_checkpoint_and_reproduces_the_straight_run(
    inputs, two_workers, tmp_path, ray_session
):
    (ray_session.fault_dir / "pretrain.after_checkpoint_4").touch()  # one worker dies right after step 4's checkpoint
    resumed = train(inputs, tmp_path / "resumed", workers=2)
    assert not (ray_session.fault_dir / "pretrain.after_checkpoint_4").exists()  # the fault fired
    a, b = losses(two_workers), losses(tmp_path / "resumed")
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6
    straight = json.loads((two_workers / "final.json").read_text())
    assert straight["val_loss"] == pytest.approx(resumed["val_loss"], abs=1e-6)
    wa, wb = (load_file(str(run / "model.safetensors")) for run in (two_workers, tmp_path / "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize(
    "deepspeed",
    [
        {"zero_stage": 2},
        {"zero_stage": 3},
        {"zero_stage": 2, "offload_optimizer": True},  # the zero2-offload preset
        {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},  # zero3-offload
    ],
    ids=["zero2", "zero3", "zero2-offload", "zero3-offload"],
)
def test_two_workers_under_zero_match_one_worker(inputs, one_worker, tmp_path, ray_session, deepspeed):
    train(inputs, tmp_path / "two", workers=2, steps=4, deepspeed=deepspeed)
    a, b = losses(one_worker), losses(tmp_path / "two")
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4  # same rows per step; reduction order differs
    one, two = (load_file(str(run / "model.safetensors")) for run in (one_worker, tmp_path / "two"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("workers,zero_stage", [(1, 0), (2, 2)], ids=["one-worker", "zero2"])
def test_bf16_precision_trains_as_fp32_does_and_exports_the_fp32_masters(
    inputs, one_worker, tmp_path, ray_session, workers, zero_stage
):
    """deepspeed.precision=bf16 (what `auto` picks on a GPU) on CPU workers: DeepSpeed's bf16 engine keeps the
    rotary tables in fp32 beside bf16 weights. The same 4 steps as fp32 within bf16's rounding, the held-out loss
    and samples (decoded in bf16) at the end. The artifact holds the optimizer's fp32 master weights (gathered from
    every partition under ZeRO-2), not the bf16 copy the steps computed with: many of its values have more bits
    than bf16 keeps."""
    out = tmp_path / "bf16"
    final = train(inputs, out, workers, steps=4, deepspeed={"zero_stage": zero_stage, "precision": "bf16"})
    fp32, bf16 = losses(one_worker), losses(out)
    assert len(bf16) == 4 and max(abs(b - a) / a for a, b in zip(fp32, bf16, strict=True)) < 2e-2
    last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(final["val_loss"]) and last["samples"]
    masters, reference = (load_file(str(run / "model.safetensors")) for run in (out, one_worker))
    beyond_bf16 = [float((w != w.bfloat16().float()).float().mean()) for w in masters.values()]
    assert min(beyond_bf16) > 0.5
    assert max((masters[k] - reference[k]).abs().max().item() for k in masters) < 2e-2


@pytest.mark.slow
def test_compiled_blocks_train_as_the_eager_model_does(inputs, two_workers, tmp_path, ray_session):
    """pretrain.compile=true on 2 workers under ZeRO-2: the same losses and weights as eager (Inductor's fused
    kernels round differently, nothing more), evaluation and samples (decoded eager) included, same weight names."""
    train(inputs, tmp_path / "compiled", workers=2, compile=True)
    a, b = losses(two_workers), losses(tmp_path / "compiled")
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    eager, compiled = (load_file(str(run / "model.safetensors")) for run in (two_workers, tmp_path / "compiled"))
    assert eager.keys() == compiled.keys()
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 1e-4
    log = [json.loads(line) for line in (tmp_path / "compiled" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["samples"] and "val_loss" in log[-1]


@pytest.mark.slow
def test_loss_guard_skips_a_nan_and_rolls_back_after_repeated_ones(inputs, tmp_path, ray_session):
    (ray_session.fault_dir / "pretrain.nan_loss_3").write_text("1")  # one NaN at step 3: skipped
    (ray_session.fault_dir / "pretrain.nan_loss_6").write_text("2")  # two in a row at step 6: roll back to step 4
    final = train(inputs, tmp_path / "guarded", workers=1, guard={"max_consecutive": 2})
    log = [json.loads(line) for line in (tmp_path / "guarded" / "train_log.jsonl").read_text().splitlines()]
    assert final["skipped_batches"] == 3 and final["rollbacks"] == 1
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6, 7, 8]  # the rolled-back step 5 is logged once, as redone
    assert all(math.isfinite(r["loss"]) for r in log)
    assert math.isfinite(final["val_loss"])


def test_a_rank_downloads_the_shared_checkpoint_files_and_its_own_partition_only(tmp_path):
    """On an object store (workers on nodes that share no disk) a resuming rank fetches what DeepSpeed reads for it,
    never the other ranks' optimizer states; consolidating ZeRO-3 weights fetches everything."""
    store = Store("store", filesystem=pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()))
    writer, reader = tmp_path / "node-a" / "work", tmp_path / "node-b" / "work"
    tag = "step-00000004"
    names = ["mp_rank_00_model_states.pt", "zero_to_fp32.py"] + [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(3) for kind in ("model", "optim")
    ]
    for name in names:
        (writer / "checkpoints" / "model" / tag).mkdir(parents=True, exist_ok=True)
        (writer / "checkpoints" / "model" / tag / name).write_text(name)
    (writer / "checkpoints" / "latest").write_text(tag)
    on_writer = store.mirror("pretrain", "a" * 12, writer, {})
    on_writer.push([f"checkpoints/model/{tag}/{name}" for name in names] + ["checkpoints/latest"])

    checkpoints = Checkpoints(reader / "checkpoints", 2, store.mirror("pretrain", "a" * 12, reader, {}), rank=1)
    assert checkpoints.latest() == tag  # read from the store: this node never saw the marker
    checkpoints.download("model", tag, 1)
    assert sorted(p.name for p in (reader / "checkpoints" / "model" / tag).iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_to_fp32.py",
    ]  # fmt: skip
    checkpoints.download_all("model")
    assert sorted(p.name for p in (reader / "checkpoints" / "model" / tag).iterdir()) == sorted(names)
