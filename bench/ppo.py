"""Benchmark PPO: rollout tokens/s with the KV cache vs without, and one PPO iteration of ours vs TRL's PPOTrainer.

    python -m bench.ppo [--dim 192] [--layers 4] [--vocab 4096] [--batch 16] [--minibatch 8] [--new-tokens 128]
                        [--threads 2] [--zero-stage 0] [--trl-python .venv-trl/bin/python]

The default shape is the `tiny` preset with the default tokenizer's 4096 pieces (the model `make run` trains), as in
bench/pretrain.py.

Rollout: the same model samples `--new-tokens` tokens for `--batch` prompts with a fixed seed, once with the KV cache
(prefill, then one position per step) and once recomputing the whole sequence every step; tokens/s side by side,
medians of `--repeats`. PPO iteration: rollout, scoring by the reward model, reference log-probs, values, GAE and
two epochs of minibatch updates of policy and value (ours: the stage's `rollout` and `update` on DeepSpeed engines,
one process, ZeRO stage `--zero-stage`: with one process ZeRO-2, the stage's default over its workers, partitions
nothing and only adds its gradient bucketing to each step), against TRL 1.12.0's `PPOTrainer` (installed only in a
separate virtualenv, `make bench-venv`) on the same exported models (ours load in transformers as LlamaForCausalLM /
LlamaForSequenceClassification), batch, minibatch, epochs and answer length. The two run alternately, one iteration each (TRL in lockstep, see
bench/ppo_trl.py), after a warm-up iteration of each; the ratio is the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptline.model.export import export, load
from gptline.model.generate import SamplingConfig, generate
from gptline.model.gpt import GPT, ModelConfig, ScalarModel
from gptline.training import rl
from gptline.training.config import DeepSpeedConfig
from gptline.training.engine import init_deepspeed
from stages import ppo
from tests.test_tokenizer import shakespeare_docs, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DIST_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}


def rollout_speed(model: GPT, prompts: list[list[int]], new_tokens: int, use_cache: bool) -> float:
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    start = time.perf_counter()
    out = generate(model, prompts, sampling, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    seconds = time.perf_counter() - start
    return sum(len(o) for o in out) / seconds


def build_models(tmp: Path, args) -> tuple[Path, Path, list[list[int]]]:
    tok = train_tokenizer(tmp, shakespeare_docs()[:1500], vocab_size=args.vocab)
    meta = json.loads((tok / "tokenizer_meta.json").read_text())
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, max_seq_len=args.prompt + args.new_tokens + 2,
                      vocab_size=meta["vocab_size"])  # fmt: skip
    torch.manual_seed(0)
    export(GPT(cfg), tmp / "sft", tok, meta["special_ids"])
    export(ScalarModel(cfg), tmp / "rm", tok, meta["special_ids"])
    (tmp / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, meta["vocab_size"], (args.batch, args.prompt), generator=generator).tolist()
    return tmp / "sft", tmp / "rm", prompts


def our_iteration(sft: Path, rm: Path, prompts: list[list[int]], args) -> Callable[[int], float]:
    """Our PPO iteration as the stage runs it on one worker: seconds of iteration `i` when called with i."""
    os.environ.update(DIST_ENV)  # a process group of one, as DeepSpeed needs
    cfg = ppo.PPOConfig(rollout_batch=args.batch, minibatch=args.minibatch, ppo_epochs=2, missing_end_penalty=0.0,
                        sampling=SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0),
                        deepspeed=DeepSpeedConfig(zero_stage=args.zero_stage))  # fmt: skip
    policy, _ = init_deepspeed(load(sft), cfg.policy_optim, cfg.deepspeed, args.minibatch, 1)
    value, _ = init_deepspeed(load(rm), cfg.value_optim, cfg.deepspeed, args.minibatch, 1)
    frozen = rl.FrozenModels(str(sft), str(rm), "model", True)

    def iteration(i: int) -> float:
        start = time.perf_counter()
        exp = ppo.rollout(policy.module, value.module, frozen, prompts, cfg, cfg.kl.coef,
                          torch.Generator().manual_seed(i))  # fmt: skip
        ppo.update(policy, value, exp, cfg, args.minibatch, torch.Generator().manual_seed(i), None)
        return time.perf_counter() - start

    return iteration


def trl_process(sft: Path, rm: Path, prompts: list[list[int]], args, log) -> subprocess.Popen:
    """TRL's PPOTrainer in its own virtualenv, one update per line we send it (bench/ppo_trl.py)."""
    # -P: bench/ must not be on the path (bench/tokenize.py would shadow the standard library module)
    command = [args.trl_python, "-P", str(ROOT / "bench" / "ppo_trl.py"), str(sft), str(rm), json.dumps(prompts),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sft, rm, prompts = build_models(Path(tmp), args)
        model = load(sft).eval()
        print(f"model: dim {args.dim}, {args.layers} layers, {model.num_params() / 1e6:.1f}M parameters; batch "
              f"{args.batch} prompts of {args.prompt} tokens, {args.new_tokens} new tokens; {args.threads} threads; "
              f"ours on ZeRO stage {args.zero_stage}")  # fmt: skip
        cached, full = [], []
        for _ in range(args.repeats):
            cached.append(rollout_speed(model, prompts, args.new_tokens, True))
            full.append(rollout_speed(model, prompts, args.new_tokens, False))
        with_cache, without = statistics.median(cached), statistics.median(full)
        print(f"rollout: {with_cache:.0f} tokens/s with the KV cache, {without:.0f} without: "
              f"{with_cache / without:.2f}x (target >= 5x)")  # fmt: skip

        ours = our_iteration(sft, rm, prompts, args)
        if not Path(args.trl_python).exists():
            times = [ours(i) for i in range(args.iterations + 1)][1:]
            print(f"one PPO iteration, ours: {statistics.median(times):.2f} s (median of {args.iterations})")
            print(f"TRL: {args.trl_python} not found; `make bench-venv` installs TRL 1.12.0 there")
            return
        # Alternating, one iteration each, so both see the same machine; the first of each is a warm-up.
        pairs = []
        with tempfile.TemporaryFile("w+") as log:
            trl = trl_process(sft, rm, prompts, args, log)
            for i in range(args.iterations + 1):
                pairs.append((ours(i), trl_iteration(trl, log)))
            trl.stdin.close()
            if trl.wait() != 0:
                log.seek(0)
                sys.exit(f"TRL run failed:\n{log.read()[-3000:]}")
        pairs = pairs[1:]
        ours_s, trl_s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        ratio = statistics.median(t / o for o, t in pairs)
        print(f"one PPO iteration (medians of {len(pairs)}, alternating): ours {ours_s:.2f} s, TRL 1.12.0 "
              f"PPOTrainer {trl_s:.2f} s; ours is {ratio:.2f}x faster (median of the pairs' ratios; target >= 1.5x)")  # fmt: skip


if __name__ == "__main__":
    main()
