"""Training-loop throughput: the pretrain stage as `gptline run` runs it, against the limit for a loop and against
transformers' Trainer, at the same shape, threads and batches.

Three loops, alternating round by round (this machine's speed drifts by 10-25% within minutes, so every ratio is
the median of the rounds' own ratios):
- ours: `gptline run ... --until pretrain` in a subprocess, one worker with `threads` threads, exactly the user's
  command (each round a new seed, so pretrain builds again on the same committed data); step times are the
  differences of the log's `time_s` between consecutive steps (the final step, which evaluates, samples and
  checkpoints, is left out, as are the first steps);
- bare: a loop of a few lines written here: the same model and initialisation, the same rows from the same loader,
  forward, backward, gradient clipping, torch's fused AdamW with the same hyperparameters and learning-rate
  schedule; no engine, no guard, no log: the limit for a loop;
- Trainer: transformers' `Trainer` on our exported model (`LlamaForCausalLM`), the same rows in the same order, the
  same optimizer (fused AdamW, betas, weight decay, clipping), evaluation and saving off; step times between
  consecutive step ends.
Shapes: `shakespeare_char` (nanoGPT's CPU baseline: 4 layers, 4 heads, width 128, context 64, batch 12,
character-level) and `tiny` (the default preset: width 192, context 256, batch 16, a 4096-piece BPE vocabulary),
both on tinyshakespeare from ../shared/data. Thread counts: 1 and every core.

    python -m bench.train_loop [--shapes shakespeare_char tiny] [--threads 1 2] [--steps 40] [--rounds 3]
    python -m bench.train_loop --device cuda   # on a GPU machine: one worker on one GPU, bf16
    python -m bench.train_loop --set pretrain.compile=true   # ours with compiled blocks (and the bare loop too)
    python -m bench.train_loop --set pretrain.deepspeed.precision=bf16   # all three in bf16 (a CPU with AMX)

Precision follows ours: where the stage trains in bf16 (its `deepspeed.precision`, `auto` on a GPU), the bare loop
runs under bf16 autocast and the Trainer with `bf16=True`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch

from gptline.model.gpt import GPT, ModelConfig
from gptline.training.config import DeepSpeedConfig, OptimConfig
from gptline.training.engine import compile_blocks, lr_at, param_groups, set_lr, use_bf16
from gptline.training.loaders import PackedLoader, TokenStream
from pipeline.artifacts import Store
from pipeline.config import typed

SHAPES = {
    "shakespeare_char": ["+experiment=shakespeare_char"],
    "tiny": ["fetch=none", "data=shakespeare"],  # the default tokenizer (bpe 4096), model (tiny) and batch (16)
}
WARMUP_STEPS = 3


def gptline_run(store: Path, overrides: list[str], until: str = "pretrain") -> None:
    command = [sys.executable, "-m", "gptline", "run", f"store.root={store}", "tracking=disabled", "run.quiet=true",
               "--until", until, *overrides]  # fmt: skip
    env = {**os.environ, "GPTLINE_PROGRESS": "quiet"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def ours(
    store: Path, shape: list[str], threads: int, steps: int, seed: int, device: str, extra: list[str]
) -> tuple[list[float], Path]:
    """Per-step seconds of the stage's own loop, and the artifact it committed."""
    schedule = {"steps": steps, "eval_every": steps, "sample_every": steps, "checkpoint_every": steps, "seed": seed}
    placement = {"num_workers": 1, "threads_per_worker": threads, "gpus_per_worker": int(device == "cuda")}
    overrides = [
        *shape,
        *extra,
        *(f"pretrain.{key}={value}" for key, value in schedule.items()),
        *(f"cluster.resources.pretrain.{key}={value}" for key, value in placement.items()),
    ]
    gptline_run(store, overrides)
    artifact = max(Store(str(store)).list("pretrain"), key=lambda a: a.manifest["timings"]["end"])
    records = [json.loads(line) for line in (Path(artifact.path) / "train_log.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in records[:-1]]  # the last step also evaluates, samples and checkpoints
    return [b - a for a, b in pairwise(times)][WARMUP_STEPS:], Path(artifact.path)


def training_setup(store: Path, artifact: Path) -> tuple[ModelConfig, dict, PackedLoader]:
    """The model config, the pretrain config and a loader yielding the stage's rows in its order (world size 1)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    cfg = manifest["config"]
    model_cfg = ModelConfig(**json.loads((artifact / "config.json").read_text())["gptline"])
    tokens = Path(Store(str(store)).load("tokenize", manifest["inputs"]["tokenize"]).path)
    pad = json.loads((artifact / "tokenizer_meta.json").read_text())["special_ids"]["pad"]
    seq_len = cfg["seq_len"] or model_cfg.max_seq_len
    loader = PackedLoader(TokenStream(tokens / "train"), cfg["batch_size"], seq_len, 0, 1, cfg["seed"], pad)
    return model_cfg, cfg, loader


def trained_in_bf16(cfg: dict) -> bool:
    """Whether the stage trained in bf16 (its precision resolved on this machine, as the worker resolved it)."""
    return use_bf16(typed(DeepSpeedConfig, cfg["deepspeed"]))


def bare(store: Path, artifact: Path, threads: int, steps: int, device: str) -> list[float]:
    """Per-step seconds of the few-line loop: same model, rows, optimizer and schedule."""
    model_cfg, cfg, loader = training_setup(store, artifact)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    model = GPT(model_cfg).to(device)
    if cfg["compile"]:  # the stage compiled its blocks (`--set pretrain.compile=true`): the limit does too
        compile_blocks(model)
    optim = OptimConfig(**cfg["optim"])
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, fused=True,
                                  betas=(optim.beta1, optim.beta2), eps=optim.eps)  # fmt: skip
    bf16 = trained_in_bf16(cfg)
    times = []
    for step in range(steps - 1):
        started = time.perf_counter()
        set_lr(optimizer, lr_at(step, steps, optim))
        inputs, targets = (torch.from_numpy(a).to(device) for a in next(loader))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(inputs, targets)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # the host sync every loop has, to report the loss
        times.append(time.perf_counter() - started)
    return times[WARMUP_STEPS:]


def trainer(store: Path, artifact: Path, threads: int, steps: int, device: str) -> list[float]:
    """Per-step seconds of transformers' Trainer on our exported model, the same rows in the same order."""
    from torch.utils.data import SequentialSampler
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    _, cfg, loader = training_setup(store, artifact)
    torch.set_num_threads(threads)
    rows = []
    for _ in range(steps):
        inputs, targets = next(loader)
        rows += [{"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y), "shift_labels": torch.from_numpy(y)}
                 for x, y in zip(inputs, targets, strict=True)]  # fmt: skip
    optim = OptimConfig(**cfg["optim"])
    model = LlamaForCausalLM.from_pretrained(str(artifact), torch_dtype=torch.float32)
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    class InOrder(Trainer):  # our loader already shuffled the rows; the Trainer keeps its order
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg["batch_size"], max_steps=steps - 1,
            learning_rate=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.beta1, adam_beta2=optim.beta2,
            adam_epsilon=optim.eps, max_grad_norm=optim.grad_clip, optim="adamw_torch_fused",
            lr_scheduler_type="cosine", warmup_steps=optim.warmup_steps, logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
            use_cpu=device == "cpu", bf16=trained_in_bf16(cfg), disable_tqdm=True, seed=cfg["seed"],
        )  # fmt: skip
        InOrder(model=model, args=args, train_dataset=rows, callbacks=[StepEnds()]).train()
    return [b - a for a, b in pairwise(ends)][WARMUP_STEPS:]


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores)"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, cores}))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per loop and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    set_help = "overrides for ours, such as pretrain.compile=true (the bare loop then compiles too)"
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=set_help)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.train_loop: --device cuda needs a CUDA GPU, and none is visible here")
    run = f"{args.steps} steps per loop, {args.rounds} rounds; ours with {args.set or 'the defaults'}"
    method = "median step times, ratios = medians of each round's own ratios"
    print(f"machine: {machine(args.device)}; torch {torch.__version__}; {run}; {method}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        seed = 1000  # a new one for every build, so pretrain builds again on the same committed data
        for shape in args.shapes:
            for threads in args.threads:
                per_round = []
                for round_ in range(args.rounds):
                    seed += 1
                    step_ours, artifact = ours(store, SHAPES[shape], threads, args.steps, seed, args.device, args.set)
                    step_bare = bare(store, artifact, threads, args.steps, args.device)
                    step_hf = trainer(store, artifact, threads, args.steps, args.device)
                    medians = [statistics.median(s) for s in (step_ours, step_bare, step_hf)]
                    per_round.append(medians)
                    print(f"  {shape} threads={threads} round {round_}: ours {medians[0] * 1e3:.1f} ms, bare "
                          f"{medians[1] * 1e3:.1f} ms, Trainer {medians[2] * 1e3:.1f} ms", flush=True)  # fmt: skip
                vs_bare = statistics.median(b / o for o, b, _ in per_round)
                vs_trainer = statistics.median(h / o for o, _, h in per_round)
                ms = [statistics.median(r[i] for r in per_round) * 1e3 for i in range(3)]
                print(f"{shape:<17} threads={threads}: ours {ms[0]:.1f} ms/step, bare {ms[1]:.1f}, Trainer {ms[2]:.1f}"
                      f" -> ours/bare {vs_bare:.2f}x (target >= 0.9x), ours/Trainer {vs_trainer:.2f}x (target >= 1.3x)",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
