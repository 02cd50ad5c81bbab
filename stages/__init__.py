"""The recipe's stages, registered in pipeline order.

Each stage module defines a config dataclass, a VERSION and a `run(cfg, inputs, out_dir, ctx)` function; this
registry is what `gptline run` executes. Stages are added here as they land (crawl-mix, tokenize, pretrain, sft,
rm, ppo, evaluate).
"""

from pipeline.dag import StageSpec

REGISTRY: list[StageSpec] = []
