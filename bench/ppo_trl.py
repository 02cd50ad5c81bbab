"""The TRL side of `python -m bench.ppo`: run in the separate virtualenv that has TRL 1.12.0 (its last release with
`PPOTrainer`), on the models `bench.ppo` exported, with the same batch, minibatch, epochs and answer length.

    .venv-trl/bin/python bench/ppo_trl.py SFT_DIR RM_DIR PROMPTS_JSON ARGS_JSON

Prints one JSON line: the seconds between consecutive PPO updates (one update = rollout + scoring + epochs), and
their median after the first.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer


class Timer(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def main() -> None:
    sft, rm, prompts, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    torch.set_num_threads(args["threads"])
    tokenizer = AutoTokenizer.from_pretrained(sft)
    dataset = Dataset.from_dict({"input_ids": prompts})
    updates = args["iterations"] + 1
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out,
            # TRL 1.12: rollout batch = per_device_train_batch_size x accumulation; minibatch = that / num_mini_batches
            per_device_train_batch_size=args["batch"],
            gradient_accumulation_steps=1,
            num_mini_batches=args["batch"] // args["minibatch"],
            num_ppo_epochs=2,
            total_episodes=args["batch"] * updates,
            response_length=args["new_tokens"],
            temperature=1.0,
            local_rollout_forward_batch_size=args["batch"],
            num_sample_generations=0,
            report_to=[],
            save_strategy="no",
            logging_steps=1000,
            use_cpu=True,
            bf16=False,
            dataloader_drop_last=True,
        )
        timer = Timer()
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(sft),
            ref_model=AutoModelForCausalLM.from_pretrained(sft),
            reward_model=AutoModelForSequenceClassification.from_pretrained(rm),
            value_model=AutoModelForSequenceClassification.from_pretrained(rm),
            train_dataset=dataset,
            callbacks=[timer],
        )
        trainer.train()
    intervals = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
    print(json.dumps({"iterations_s": intervals, "median_iteration_s": statistics.median(intervals[1:])}))


if __name__ == "__main__":
    main()
