"""The recipe's stages, registered in pipeline order.

Each stage module defines a config dataclass, a VERSION and a `run(cfg, inputs, out_dir, ctx)` function; this
registry is what `gptline run` executes.
"""

from pipeline.dag import StageResources, StageSpec
from stages import crawl_mix, evaluate, fetch, ppo, pretrain, rm, sft, tokenize, tokenizer

REGISTRY: list[StageSpec] = [
    StageSpec("fetch", fetch.run, fetch.FetchConfig, version=fetch.VERSION),
    StageSpec(
        "crawl_mix",
        crawl_mix.run,
        crawl_mix.CrawlMixConfig,
        inputs=("fetch",),
        config_key="data",
        version=crawl_mix.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        report=crawl_mix.report,
    ),
    StageSpec(
        "tokenizer",
        tokenizer.run,
        tokenizer.TokenizerConfig,
        inputs=("crawl_mix",),
        version=tokenizer.VERSION,
        resources=StageResources(num_cpus=2.0),  # sentencepiece trains with this many threads
    ),
    StageSpec(
        "tokenize",
        tokenize.run,
        tokenize.TokenizeConfig,
        inputs=("crawl_mix", "tokenizer"),
        version=tokenize.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        report=tokenize.report,
    ),
    StageSpec(
        "pretrain",
        pretrain.run,
        pretrain.PretrainConfig,
        inputs=("tokenizer", "tokenize"),
        version=pretrain.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        stops_on_request=True,
        report=pretrain.report,
    ),
    StageSpec(
        "sft",
        sft.run,
        sft.SFTConfig,
        inputs=("pretrain", "tokenizer", "fetch"),
        version=sft.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        stops_on_request=True,
        report=sft.report,
    ),
    StageSpec(
        "rm",
        rm.run,
        rm.RMConfig,
        inputs=("sft", "fetch"),
        version=rm.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        stops_on_request=True,
        report=rm.report,
    ),
    StageSpec(
        "ppo",
        ppo.run,
        ppo.PPOConfig,
        inputs=("sft", "rm", "tokenize"),
        version=ppo.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        stops_on_request=True,
        report=ppo.report,
    ),
    StageSpec(
        "evaluate",
        evaluate.run,
        evaluate.EvaluateConfig,
        inputs=("pretrain", "sft", "rm", "ppo", "tokenize"),
        version=evaluate.VERSION,
        resources=StageResources(num_cpus=2.0),  # one process; torch uses this many threads
        report=evaluate.report,
    ),
]
