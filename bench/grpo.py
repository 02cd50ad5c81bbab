"""Benchmark GRPO: one iteration of the grpo stage's code against TRL's GRPOTrainer, side by side in one run.

    python -m bench.grpo [--dim 192] [--layers 4] [--vocab 4096] [--prompt 32] [--batch 8] [--group 8]
                         [--minibatch 16] [--new-tokens 64] [--threads 2] [--trl-python .venv-trl/bin/python]
                         [--profile]

One iteration: `--batch` prompts, `--group` answers to each sampled with `--new-tokens` new tokens, scored by the
same programmatic reward, reference log-probs for the KL term (coefficient 0.04, in the loss), group advantages, and
one pass of minibatch updates (`--minibatch` answers each) with the clipped objective. Ours: the stage's `rollout` and
`update` on a DeepSpeed engine, one process, ZeRO stage 0 (a group of one partitions nothing). TRL: `GRPOTrainer`
of the release `make bench-venv` pins (a separate virtualenv) on the same exported model (it loads in transformers
as LlamaForCausalLM), with `steps_per_generation` minibatch steps per generation. The two run alternately, one
iteration each (bench/grpo_trl.py in lockstep), after a warm-up iteration of each; the ratio is the median of the
pairs' ratios. Below the 1.3x target, or with `--profile`, it prints where our iteration's time goes (torch.profiler,
top operators).
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
from collections.abc import Callable
from pathlib import Path

import torch

from gptline.data.chat import ChatTemplate
from gptline.model.export import export, load
from gptline.model.generate import SamplingConfig
from gptline.model.gpt import GPT, ModelConfig
from gptline.training.config import DeepSpeedConfig
from gptline.training.engine import init_deepspeed
from gptline.training.rl import FrozenModels
from stages import grpo
from tests.test_tokenizer import shakespeare_docs, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DIST_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29534"}
REWARD = "bench.grpo:e_fraction"


def e_fraction(texts: list[str], references: list[str | None]) -> list[float]:
    """The bench's reward on both sides (bench/grpo_trl.py has TRL's copy of its signature)."""
    return [10 * t.count("e") / max(1, len(t)) for t in texts]


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")  # fmt: skip
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.node()}: {model}, {os.cpu_count()} cores visible, load average {load}"


def build_model(tmp: Path, args) -> tuple[Path, list[str]]:
    """A random model exported like sft's, and prompts: Shakespeare lines cut to `--prompt` tokens, as text (TRL
    tokenizes its prompts itself; sentencepiece gives back the same ids)."""
    docs = shakespeare_docs()[:1500]
    tok = train_tokenizer(tmp, docs, vocab_size=args.vocab)
    meta = json.loads((tok / "tokenizer_meta.json").read_text())
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=args.prompt + args.new_tokens + 8, vocab_size=meta["vocab_size"])  # fmt: skip
    torch.manual_seed(0)
    export(GPT(cfg), tmp / "sft", tok, meta["special_ids"])
    template = ChatTemplate(tmp / "sft")
    text = " ".join(" ".join(docs[:20]).split())
    ids = template.tokenizer.encode(text)
    prompts = [template.decode(ids[i * args.prompt : (i + 1) * args.prompt]) for i in range(args.batch)]
    return tmp / "sft", prompts


def our_iteration(sft: Path, prompts: list[str], args) -> Callable[[int], float]:
    """Our GRPO iteration as the stage runs it on one worker: seconds of iteration `i` when called with i."""
    os.environ.update(DIST_ENV)  # a process group of one, as DeepSpeed needs
    cfg = grpo.GRPOConfig(rollout_batch=args.batch, group_size=args.group, minibatch=args.minibatch, epochs=1,
                          sampling=SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0),
                          kl=grpo.GRPOKLConfig(coef=args.kl_coef), reward=REWARD,
                          deepspeed=DeepSpeedConfig(zero_stage=0))  # fmt: skip
    policy, _ = init_deepspeed(load(sft), cfg.optim, cfg.deepspeed, args.minibatch, 1)
    frozen = FrozenModels(str(sft), None, REWARD, True)
    template = frozen.template
    ids = [template.tokenizer.encode(p) for p in prompts]
    repeated = [p for p in ids for _ in range(args.group)]
    references = [None] * len(repeated)

    def iteration(i: int) -> float:
        start = time.perf_counter()
        exp = grpo.rollout(policy.module, frozen, repeated, references, cfg, torch.Generator().manual_seed(i))
        grpo.update(policy, exp, cfg, args.minibatch, torch.Generator().manual_seed(i))
        return time.perf_counter() - start

    return iteration


def trl_process(sft: Path, prompts: list[str], args, log) -> subprocess.Popen:
    """TRL's GRPOTrainer in its own virtualenv, one iteration per line we send it (bench/grpo_trl.py)."""
    # -P: bench/ must not be on the path (bench/tokenize.py would shadow the standard library module)
    command = [args.trl_python, "-P", str(ROOT / "bench" / "grpo_trl.py"), str(sft), json.dumps(prompts),
               json.dumps(vars(args))]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # TRL runs as a plain single process
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def trl_iteration(trl: subprocess.Popen, log) -> float:
    trl.stdin.write("go\n")
    trl.stdin.flush()
    for line in trl.stdout:
        if line.startswith('{"iteration_s"'):
            return json.loads(line)["iteration_s"]
    log.seek(0)
    sys.exit(f"TRL run failed:\n{log.read()[-3000:]}")


def profile(ours: Callable[[int], float], rows: int = 15) -> None:
    """Where one of our iterations spends its time: the operators with the most CPU time, self and total."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        ours(99)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kl-coef", type=float, default=0.04)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        sft, prompts = build_model(Path(tmp), args)
        print(f"model: dim {args.dim}, {args.layers} layers, {load(sft).num_params() / 1e6:.1f}M parameters; "
              f"{args.batch} prompts of {args.prompt} tokens x {args.group} answers of {args.new_tokens} new tokens, "
              f"minibatch {args.minibatch}; {args.threads} threads")  # fmt: skip
        ours = our_iteration(sft, prompts, args)
        if not Path(args.trl_python).exists():
            times = [ours(i) for i in range(args.iterations + 1)][1:]
            print(f"one GRPO iteration, ours: {statistics.median(times):.2f} s (median of {args.iterations})")
            print(f"TRL: {args.trl_python} not found; `make bench-venv` installs TRL there")
        else:
            # Alternating, one iteration each, so both see the same machine; the first of each is a warm-up.
            pairs = []
            with tempfile.TemporaryFile("w+") as log:
                trl = trl_process(sft, prompts, args, log)
                for i in range(args.iterations + 1):
                    pairs.append((ours(i), trl_iteration(trl, log)))
                trl.stdin.close()
                if trl.wait() != 0:
                    log.seek(0)
                    sys.exit(f"TRL run failed:\n{log.read()[-3000:]}")
            pairs = pairs[1:]
            ours_s, trl_s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            ratio = statistics.median(t / o for o, t in pairs)
            print(f"one GRPO iteration (medians of {len(pairs)}, alternating): ours {ours_s:.2f} s, TRL GRPOTrainer "
                  f"{trl_s:.2f} s; ours is {ratio:.2f}x faster (median of the pairs' ratios; target >= 1.3x)")  # fmt: skip
            print(f"machine after: {machine()}")
            if ratio < 1.3:
                print("below the 1.3x target; where our iteration's time goes:")
                profile(ours)
                return
        if args.profile:
            profile(ours)


if __name__ == "__main__":
    main()
