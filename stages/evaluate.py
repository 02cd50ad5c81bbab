"""evaluate: the run's models measured side by side: the last node of the DAG, over every model stage.

Models: `base` (pretrain), `sft`, every aligned model the run built (the alignment stages the `alignment` key
chose: ppo, dpo; each an input under its stage's name), and two built from sft by sampling: `best_of_n` (n sft
answers, the one the reward model scores highest) and `sft_resample` (sft with another seed: the control, judged
against sft it must win about half the time). The reward model (rm) is the judge.

What it measures, all written to `evaluation.json` (and the answers to `samples.jsonl`):
- perplexity of base, sft and each aligned model on the held-out pretraining tokens (the tokenize artifact's
  validation split) and on the held-out SFT answers (only the assistant tokens, as sft's loss);
- few-shot prompting: the base model (and the others, for contrast) on the built-in tasks of
  `gptline/data/fewshot.py`, zero-shot and k-shot, accuracy by log-likelihood against chance;
- the reward model's accuracy on its held-out comparisons, beside the length-only baseline (longer answer wins);
- answers to held-out prompts: the prompts of the rm's held-out comparisons, which no training stage saw (ppo's
  default prompts are sft's held-out prompts, so those would flatter ppo; dpo holds out the same comparisons as
  rm at the same seed and fraction). sft, the aligned models, best-of-n and the control answer through the chat
  template; the base model is prompted as an assistant with a plain-text dialogue and its answer is its first line;
- win rates judged by the reward model: for each prompt the answer with the higher reward wins (equal: a tie,
  half a win); the rate with its standard error, for each aligned model vs sft and vs base, each aligned model
  vs each other, sft vs base, best-of-n vs sft, and the control;
- Elo ratings from the same judgments: a Bradley-Terry fit (Hunter's MM iterations, one virtual tie per pair as a
  prior so an unbeaten model stays finite), on the Elo scale, mean 1000;
- entropy of each model's next-token distribution (temperature 1), at the first answer position and averaged over
  its own answer's tokens, on the same prompts; and each answering model's mean answer length in tokens;
- held-out accuracy on the verifiable sets (tasks with one checkable answer, from the fetch artifact: the generated
  arithmetic set's held-out split, which grpo never trains on, and the evals registry's math sets): sft and each
  aligned model answer greedily through the chat template, scored by the exact-answer reward. A set whose files
  the fetch config did not produce (`fetch=none`) is left out with a note naming its key.

Each model's figures are keyed by its name (`perplexity`, `fewshot`, `entropy`, `answer_length`, `verifiable`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptline.data import fewshot
from gptline.data.chat import ChatTemplate, Message, Skipped
from gptline.data.formats import COMPARISONS, EXAMPLES, load_ragged
from gptline.data.readers import MAX_LINE_BYTES
from gptline.data.verifiable import exact_answer, held_out_reward, read_tasks
from gptline.model.export import load
from gptline.model.generate import SamplingConfig, generate
from gptline.model.gpt import GPT, IGNORE_INDEX, ScalarModel, rewards_at
from gptline.training.loaders import TokenStream, collate_examples, pad_rows
from pipeline.checks import at_least
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 3
EVALUATION = "evaluation.json"
SAMPLES = "samples.jsonl"
# The inputs that are not aligned models; every other input is one (an alignment stage's chat model).
JUDGED_BY = ("pretrain", "sft", "rm", "tokenize", "fetch")
CONTROL = ("sft_resample", "sft")
BASE_DIALOGUE = (
    "A conversation between a user and a helpful assistant.\n\n"
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.\n\n"
    "User: {question}\nAssistant:"
)


@dataclass
class VerifiableConfig:
    sets: dict[str, str] = field(default_factory=lambda: {"arithmetic": "{fetch}/arithmetic/held_out.jsonl",
                                                          "evals_math": "{fetch}/verifiable_evals/*.jsonl"})  # fmt: skip
    tasks: int = 200  # the first tasks of each set, in file order (0: all)
    max_new_tokens: int = 16
    max_line_bytes: int = MAX_LINE_BYTES  # a longer JSONL line is skipped and counted, never read whole

    def validate(self) -> list[tuple[str, str]]:
        return at_least(self, 0, "tasks") + at_least(self, 1, "max_new_tokens", "max_line_bytes")


@dataclass
class EvaluateConfig:
    num_prompts: int = 48  # held-out prompts the models answer
    best_of: int = 4  # n of best-of-n
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=0.7, top_k=40)
    )
    batch_size: int = 16  # sequences per forward pass
    perplexity_tokens: int = 65536  # held-out pretraining tokens scored per model (0: all)
    shots: int = 3  # the k of k-shot
    verifiable: VerifiableConfig = field(default_factory=VerifiableConfig)
    seed: int = 0

    def validate(self) -> list[tuple[str, str]]:
        problems = at_least(self, 1, "num_prompts", "best_of", "batch_size") + at_least(
            self, 0, "perplexity_tokens", "shots", "seed"
        )
        return problems + [(f"sampling.{k}", v) for k, v in self.sampling.validate()]


# ---- judgments -------------------------------------------------------------------------------------------------
def matchups(aligned: list[str]) -> list[tuple[str, str]]:
    """(a, b) pairs judged: each aligned model against sft and base, and against each other; sft against base;
    best-of-n against sft; the control last."""
    against_sft = [(a, "sft") for a in aligned]
    against_base = [(a, "base") for a in aligned]
    between = [(a, b) for i, a in enumerate(aligned) for b in aligned[i + 1 :]]
    return [*against_sft, *between, ("sft", "base"), ("best_of_n", "sft"), *against_base, CONTROL]


def outcomes(rewards_a: np.ndarray, rewards_b: np.ndarray) -> np.ndarray:
    """Per prompt: 1 when a's answer has the higher reward, 0 when b's has, 0.5 for a tie."""
    return np.where(rewards_a > rewards_b, 1.0, np.where(rewards_a < rewards_b, 0.0, 0.5))


def win_rate(results: np.ndarray) -> tuple[float, float]:
    """Mean outcome and its standard error."""
    n = len(results)
    rate = float(results.mean())
    return rate, float(results.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def elo(games: list[tuple[str, str, float]], iterations: int = 500) -> dict[str, float]:
    """Elo ratings (mean 1000) from (a, b, score of a) games by a Bradley-Terry fit; one virtual tie per pair."""
    players = sorted({p for a, b, _ in games for p in (a, b)})
    index = {p: i for i, p in enumerate(players)}
    n = len(players)
    wins, played = np.zeros((n, n)), np.zeros((n, n))
    for a, b, score in games:
        i, j = index[a], index[b]
        wins[i, j] += score
        wins[j, i] += 1 - score
        played[i, j] += 1
        played[j, i] += 1
    prior = (played > 0).astype(float)
    wins, played = wins + 0.5 * prior, played + prior
    strength = np.ones(n)
    for _ in range(iterations):
        denominators = (played / (strength[:, None] + strength[None, :])).sum(1)
        strength = wins.sum(1) / denominators
        strength /= np.exp(np.log(strength).mean())
    ratings = 400 * np.log10(strength)
    return {p: float(1000 + r - ratings.mean()) for p, r in zip(players, ratings, strict=True)}


# ---- model helpers ---------------------------------------------------------------------------------------------
def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def distribution_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyRecorder:
    """A generate() step callback: each row's next-token entropy at every step until it has stopped (else NaN)."""

    def __init__(self, rows: int, stop_ids: list[int]):
        self.active, self.stop_ids = torch.ones(rows, dtype=torch.bool), torch.tensor(stop_ids)
        self.entropies: list[torch.Tensor] = []

    def __call__(self, token: torch.Tensor, logits: torch.Tensor) -> None:
        self.entropies.append(torch.where(self.active, distribution_entropy(logits).cpu(), torch.nan))
        self.active = self.active & ~torch.isin(token.cpu(), self.stop_ids)


@torch.no_grad()
def sample_answers(model: GPT, prompts: list[list[int]], cfg: EvaluateConfig, stop_ids: list[int], pad: int,
                   seed: int) -> tuple[list[list[int]], list[float], list[float]]:  # fmt: skip
    """Answers to the prompts, and per answer the entropy at its first position and over its tokens."""
    generator = torch.Generator().manual_seed(seed)
    answers, first, mean = [], [], []
    for batch in batches(prompts, cfg.batch_size):
        room = model.cfg.max_seq_len - max(len(p) for p in batch)
        sampling = SamplingConfig(**{**asdict(cfg.sampling), "max_new_tokens": min(cfg.sampling.max_new_tokens, room)})
        recorder = EntropyRecorder(len(batch), stop_ids)
        answers += generate(model, batch, sampling, stop_ids, pad, generator, on_step=recorder)
        per_step = torch.stack(recorder.entropies, 1)
        first += per_step[:, 0].tolist()
        mean += per_step.nanmean(1).tolist()
    return answers, first, mean


@torch.no_grad()
def sequence_logprobs(model: GPT, contexts: list[list[int]], continuations: list[list[int]], pad: int,
                      batch_size: int) -> list[float]:  # fmt: skip
    """log p(continuation | context) for each pair, summed over the continuation's tokens."""
    scores = []
    pairs = list(zip(contexts, continuations, strict=True))
    for batch in batches(pairs, batch_size):
        rows = [(c + x)[-model.cfg.max_seq_len - 1 :] for c, x in batch]
        width = max(len(r) for r in rows) - 1
        inputs = torch.full((len(rows), width), pad, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, (_, x)) in enumerate(zip(rows, batch, strict=True)):
            inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
            targets[i, len(row) - 1 - len(x) : len(row) - 1] = torch.tensor(x)
        logits, _ = model(inputs)
        logp = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        scores += (logp * (targets != IGNORE_INDEX)).sum(-1).tolist()
    return scores


def continuation(sp, context: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the answer as the tokenizer splits the whole text."""
    whole, ctx = sp.encode(context + answer), sp.encode(context)
    shared = next((i for i, (a, b) in enumerate(zip(whole, ctx, strict=False)) if a != b), min(len(whole), len(ctx)))
    return whole[:shared], whole[shared:]


@torch.no_grad()
def perplexity(model: GPT, rows: list[tuple[np.ndarray, np.ndarray]], pad: int, batch_size: int) -> float:
    """exp of the mean next-token loss over the targets of (inputs, targets) rows."""
    total, count = 0.0, 0
    for batch in batches(rows, batch_size):
        width = max(len(x) for x, _ in batch)
        inputs = torch.full((len(batch), width), pad, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            inputs[i, : len(x)], targets[i, : len(y)] = torch.from_numpy(x), torch.from_numpy(y)
        valid = int((targets != IGNORE_INDEX).sum())
        total += float(model(inputs, targets)[1]) * valid
        count += valid
    return math.exp(total / max(count, 1))


def pretraining_rows(tokens: TokenStream, context: int, budget: int) -> list[tuple[np.ndarray, np.ndarray]]:
    stop = tokens.total if not budget else min(tokens.total, budget + 1)
    return [(row[:-1], row[1:]) for start in range(0, stop - 1, context)
            if len(row := tokens.slice(start, min(start + context + 1, stop))) > 1]  # fmt: skip


def sft_rows(sft_dir: Path, pad: int) -> list[tuple[np.ndarray, np.ndarray]]:
    held_out = load_ragged(sft_dir / EXAMPLES, "validation_ids", "validation_trained")
    rows = []
    for ids, trained in zip(held_out["validation_ids"], held_out["validation_trained"], strict=True):
        inputs, targets = collate_examples([(ids, trained)], pad)
        rows.append((inputs[0], targets[0]))
    return rows


def held_out_prompts(rm_dir: Path, template: ChatTemplate, count: int) -> list[list[Message]]:
    """The distinct prompts of the rm's held-out comparisons, in file order."""
    chosen = load_ragged(rm_dir / COMPARISONS, "validation_chosen")["validation_chosen"]
    assistant = template.ids["assistant"]
    seen, prompts = set(), []
    for ids in chosen:
        cut = int(np.flatnonzero(ids == assistant)[-1])
        key = tuple(ids[:cut].tolist())
        if key not in seen:
            seen.add(key)
            prompts.append(template.messages(ids[:cut].tolist()))
    return prompts[:count]


class Judge:
    """The reward model's raw score for an answer to a prompt (prompt + answer + reward token)."""

    def __init__(self, model: ScalarModel, template: ChatTemplate, batch_size: int):
        self.model, self.template, self.batch_size = model, template, batch_size

    @torch.no_grad()
    def rewards(self, prompts: list[list[Message]], answers: list[str]) -> np.ndarray:
        rows = [self.template.reward_input(p, a) for p, a in zip(prompts, answers, strict=True)]
        return self.rows(rows)

    @torch.no_grad()
    def rows(self, rows: list[np.ndarray]) -> np.ndarray:
        out = []
        for batch in batches(rows, self.batch_size):
            tokens, mask = pad_rows(batch, self.template.ids["pad"])
            out += rewards_at(self.model, torch.from_numpy(tokens), torch.from_numpy(mask),
                              self.template.ids["reward"]).tolist()  # fmt: skip
        return np.array(out)


# ---- the parts -------------------------------------------------------------------------------------------------
def reward_model_accuracy(judge: Judge, rm_dir: Path) -> dict[str, float]:
    pairs = load_ragged(rm_dir / COMPARISONS, "validation_chosen", "validation_rejected")
    chosen, rejected = pairs["validation_chosen"], pairs["validation_rejected"]
    margin = judge.rows(chosen) - judge.rows(rejected)
    longer = np.array([len(c) > len(r) for c, r in zip(chosen, rejected, strict=True)], dtype=float)
    same = np.array([len(c) == len(r) for c, r in zip(chosen, rejected, strict=True)])
    return {"accuracy": float((margin > 0).mean() + 0.5 * (margin == 0).mean()),
            "length_baseline": float(np.where(same, 0.5, longer).mean()),
            "mean_margin": float(margin.mean()), "pairs": len(chosen)}  # fmt: skip


def fewshot_accuracy(model: GPT, sp, shots: int, pad: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Per task: accuracy zero-shot and k-shot (the choice with the highest log-probability)."""
    results: dict[str, dict[str, float]] = {}
    for name, task in fewshot.TASKS.items():
        results[name] = {"chance": 1 / fewshot.CHOICES}
        for k in sorted({0, shots}):
            contexts, continuations = [], []
            for i, item in enumerate(task):
                for choice in item.choices:
                    context, answer = continuation(sp, fewshot.prompt(task, i, k), choice)
                    contexts.append(context)
                    continuations.append(answer)
            scores = np.array(sequence_logprobs(model, contexts, continuations, pad, batch_size))
            picked = scores.reshape(len(task), fewshot.CHOICES).argmax(1)
            correct = [item.choices.index(item.answer) for item in task]
            results[name][f"{k}_shot"] = float((picked == np.array(correct)).mean())
    return results


def verifiable_accuracy(cfg: VerifiableConfig, fetch: Path, template: ChatTemplate, models: dict[str, GPT],
                        batch_size: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per set: how many tasks were answered and each model's accuracy (greedy answers, the exact-answer reward),
    or why the set was left out."""
    greedy = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    context = min(m.cfg.max_seq_len for m in models.values())
    results: dict[str, dict[str, Any]] = {}
    for name, pattern in cfg.sets.items():
        skipped = Skipped()
        key = f"evaluate.verifiable.sets.{name}"
        try:
            found = read_tasks([pattern.format(fetch=fetch)], key, skipped, cfg.max_line_bytes)
        except GptlineError as missing:
            results[name] = {"left_out": str(missing)}
            continue
        tasks = [(template.prompt(messages), answer) for _, messages, answer in found if answer is not None]
        fitting = [t for t in tasks if len(t[0]) + cfg.max_new_tokens <= context]
        chosen = fitting[: cfg.tasks] if cfg.tasks else fitting
        results[name] = {"tasks": len(chosen), "too_long": len(tasks) - len(fitting), "skipped": skipped.summary(),
                         "accuracy": {model_name: held_out_reward(model, template, chosen, exact_answer, greedy,
                                                                  batch_size=batch_size)
                                      for model_name, model in models.items()}}  # fmt: skip
    return results


def base_dialogue_prompt(sp, messages: list[Message], end_of_text: int) -> list[int]:
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return [end_of_text, *sp.encode(BASE_DIALOGUE.format(question=question))]


def first_line(text: str) -> str:
    """The base model's answer in the dialogue: its first non-empty line."""
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


# ---- the stage -------------------------------------------------------------------------------------------------
def run(cfg: EvaluateConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    torch.set_num_threads(max(1, int(ctx.resources.num_cpus)))
    say: Callable[[str], None] = (lambda text: None) if ctx.quiet else (lambda text: print(f"[evaluate] {text}",
                                                                                          flush=True))  # fmt: skip
    template = ChatTemplate(inputs["sft"])
    sp, pad, ids = template.tokenizer, template.ids["pad"], template.ids
    aligned = [name for name in inputs if name not in JUDGED_BY]
    stages = {"base": "pretrain", "sft": "sft", **{name: name for name in aligned}}
    models = {name: load(inputs[stage]).eval() for name, stage in stages.items()}
    context = models["sft"].cfg.max_seq_len
    judge = Judge(load(inputs["rm"]).eval(), template, cfg.batch_size)

    say("perplexity")
    held_out_tokens = pretraining_rows(TokenStream(inputs["tokenize"] / "validation"), context, cfg.perplexity_tokens)
    answers_rows = sft_rows(inputs["sft"], pad)
    perplexities = {name: {"pretraining_text": perplexity(m, held_out_tokens, pad, cfg.batch_size),
                           "sft_answers": perplexity(m, answers_rows, pad, cfg.batch_size)}
                    for name, m in models.items()}  # fmt: skip

    say("few-shot tasks")
    few = {name: fewshot_accuracy(m, sp, cfg.shots, pad, cfg.batch_size) for name, m in models.items()}

    say("reward model on its held-out comparisons")
    rm_accuracy = reward_model_accuracy(judge, inputs["rm"])

    prompts = held_out_prompts(inputs["rm"], template, cfg.num_prompts)
    prompts = [p for p in prompts if len(template.prompt(p)) + cfg.sampling.max_new_tokens + 2 <= context]
    if len(prompts) < 2:
        raise GptlineError(f"evaluate: {len(prompts)} held-out rm prompts leave room for "
                           f"evaluate.sampling.max_new_tokens={cfg.sampling.max_new_tokens}; need at least 2")  # fmt: skip
    say(f"answers to {len(prompts)} held-out prompts")
    chat_prompts = [template.prompt(p) for p in prompts]
    stop = [template.end_of_turn]
    texts: dict[str, list[str]] = {}
    lengths: dict[str, list[int]] = {}
    entropy: dict[str, dict[str, float]] = {}

    def answer(name: str, model: str, encoded: list[list[int]], stop_ids: list[int], seed: int, decode) -> None:
        tokens, first, mean = sample_answers(models[model], encoded, cfg, stop_ids, pad, seed)
        texts[name] = [decode(t) for t in tokens]
        lengths[name] = [len(t) for t in tokens]
        entropy.setdefault(model, {"first_token": float(np.nanmean(first)), "answer_tokens": float(np.nanmean(mean))})

    for name in ("sft", *aligned):
        answer(name, name, chat_prompts, stop, cfg.seed, template.decode)
    answer("sft_resample", "sft", chat_prompts, stop, cfg.seed + 1, template.decode)
    base_prompts = [base_dialogue_prompt(sp, p, ids["end_of_text"]) for p in prompts]
    answer("base", "base", base_prompts, [ids["end_of_text"]], cfg.seed,
           lambda t: first_line(sp.decode([i for i in t if i != ids["end_of_text"]])))  # fmt: skip
    rewards = {name: judge.rewards(prompts, answers) for name, answers in texts.items()}
    say("held-out accuracy on the verifiable sets")
    chat_models = {name: models[name] for name in ("sft", *aligned)}
    verifiable = verifiable_accuracy(cfg.verifiable, inputs["fetch"], template, chat_models, cfg.batch_size)
    candidates = [sample_answers(models["sft"], chat_prompts, cfg, stop, pad, cfg.seed + 100 + k)[0]
                  for k in range(cfg.best_of)]  # fmt: skip
    candidate_texts = [[template.decode(t) for t in c] for c in candidates]
    candidate_rewards = np.stack([judge.rewards(prompts, c) for c in candidate_texts])
    best = candidate_rewards.argmax(0)
    texts["best_of_n"] = [candidate_texts[k][i] for i, k in enumerate(best)]
    lengths["best_of_n"] = [len(candidates[k][i]) for i, k in enumerate(best)]
    rewards["best_of_n"] = candidate_rewards.max(0)

    games: list[tuple[str, str, float]] = []
    judged = []
    for a, b in matchups(aligned):
        results = outcomes(rewards[a], rewards[b])
        rate, stderr = win_rate(results)
        judged.append({"a": a, "b": b, "win_rate": rate, "stderr": stderr, "prompts": len(results),
                       "ties": int((results == 0.5).sum())})  # fmt: skip
        if (a, b) != CONTROL:  # the control is a check of the judge, not a player
            games += [(a, b, float(r)) for r in results]
    ratings = elo(games)

    samples = [{"prompt": p, "answers": {n: {"text": texts[n][i], "reward": float(rewards[n][i])} for n in texts}}
               for i, p in enumerate(prompts)]  # fmt: skip
    evaluation = {
        "perplexity": perplexities,
        "fewshot": few,
        "reward_model": rm_accuracy,
        "aligned": aligned,
        "matchups": judged,
        "elo": ratings,
        "entropy": entropy,
        "answer_length": {n: float(np.mean(v)) for n, v in lengths.items()},
        "verifiable": verifiable,
        "mean_reward": {n: float(r.mean()) for n, r in rewards.items()},
        "prompts": len(prompts),
        "best_of": cfg.best_of,
    }
    (out_dir / EVALUATION).write_text(json.dumps(evaluation, indent=2) + "\n")
    (out_dir / SAMPLES).write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    for m in judged:
        say(f"{m['a']} vs {m['b']}: win rate {m['win_rate']:.2f} ± {m['stderr']:.2f} over {m['prompts']} prompts")
    for name, result in verifiable.items():
        scores = ", ".join(f"{m} {a:.2f}" for m, a in result.get("accuracy", {}).items())
        say(f"{name}: left out ({result['left_out']})" if "left_out" in result
            else f"{name}: accuracy over {result['tasks']} held-out tasks: {scores}")  # fmt: skip
    verifiable_metrics = {
        f"verifiable_{task_set}_{name}": accuracy
        for task_set, result in verifiable.items()
        for name, accuracy in result.get("accuracy", {}).items()
    }
    return {
        **{f"win_{m['a']}_vs_{m['b']}": m["win_rate"] for m in judged},
        "rm_accuracy": rm_accuracy["accuracy"],
        **{f"elo_{name}": r for name, r in ratings.items()},
        **{f"ppl_{name}": p["pretraining_text"] for name, p in perplexities.items()},
        **{f"entropy_{name}": e["first_token"] for name, e in entropy.items()},
        **{f"length_{name}": v for name, v in evaluation["answer_length"].items()},
        **verifiable_metrics,
        **{f"fewshot_{name}": float(np.mean([t[f"{cfg.shots}_shot"] for t in few[name].values()])) for name in few},
    }


def report(directory: Path) -> list[dict[str, Any]]:
    """Win rates, Elo, perplexity, few-shot and verifiable-set accuracy, entropy, and answers side by side."""
    e = json.loads((directory / EVALUATION).read_text())
    matchups = [f"{m['a']} vs {m['b']}" for m in e["matchups"]]
    players = sorted(e["elo"], key=e["elo"].get)
    samples = [json.loads(line) for line in (directory / SAMPLES).read_text().splitlines()[:8]]
    language_models = list(e["perplexity"])  # base, sft, then the aligned models
    shown = ["base", "sft", "best_of_n", *e["aligned"]]
    verifiable = e.get("verifiable", {})  # evaluations of VERSION 2 have none
    scored = {name: result for name, result in verifiable.items() if "accuracy" in result}
    left_out = [[name, result["left_out"]] for name, result in verifiable.items() if "left_out" in result]
    answering = ["sft", *e["aligned"]]
    verifiable_sections = []
    if scored:
        verifiable_sections.append(
            {"kind": "bars", "title": "held-out accuracy on the verifiable sets (greedy answers, exact answer)",
             "categories": [f"{name} ({result['tasks']} tasks)" for name, result in scored.items()],
             "series": {m: [result["accuracy"][m] for result in scored.values()] for m in answering}})  # fmt: skip
    if left_out:
        verifiable_sections.append({"kind": "table", "title": "verifiable sets left out", "columns": ["set", "why"],
                                    "rows": left_out})  # fmt: skip
    return [
        {"kind": "bars", "title": f"win rate judged by the reward model ({e['prompts']} held-out prompts)",
         "categories": matchups, "series": {"win rate": [m["win_rate"] for m in e["matchups"]]}},
        {"kind": "bars", "title": "Elo − 1000 (Bradley-Terry on the same judgments; mean 1000)",
         "categories": players, "series": {"Elo − 1000": [e["elo"][p] - 1000 for p in players]}},
        {"kind": "table", "title": "win rates", "columns": ["model", "against", "win rate", "stderr", "ties",
                                                            "prompts"],
         "rows": [[m["a"], m["b"], m["win_rate"], m["stderr"], m["ties"], m["prompts"]] for m in e["matchups"]]},
        {"kind": "table", "title": "perplexity, mean reward, entropy and answer length",
         "columns": ["model", "ppl held-out text", "ppl sft answers", "mean reward", "entropy first token",
                     "entropy answer tokens", "answer tokens"],
         "rows": [[n, e["perplexity"][n]["pretraining_text"], e["perplexity"][n]["sft_answers"],
                   e["mean_reward"][n], e["entropy"][n]["first_token"], e["entropy"][n]["answer_tokens"],
                   e["answer_length"][n]] for n in language_models]},
        {"kind": "table", "title": "few-shot accuracy (log-likelihood of 4 choices; chance 0.25)",
         "columns": ["model", "task", *sorted(next(iter(next(iter(e["fewshot"].values())).values())))],
         "rows": [[n, task, *[scores[k] for k in sorted(scores)]] for n, tasks in e["fewshot"].items()
                  for task, scores in tasks.items()]},
        *verifiable_sections,
        {"kind": "table", "title": "reward model on its held-out comparisons",
         "columns": ["pairs", "accuracy", "longer answer wins", "mean margin"],
         "rows": [[e["reward_model"][k] for k in ("pairs", "accuracy", "length_baseline", "mean_margin")]]},
        {"kind": "table", "title": "answers side by side (reward in brackets)", "columns": ["prompt", *shown],
         "rows": [[s["prompt"][-1]["content"], *[f"[{s['answers'][n]['reward']:.2f}] {s['answers'][n]['text']}"
                                                 for n in shown]] for s in samples]},
    ]  # fmt: skip
