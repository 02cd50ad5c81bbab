"""The recipe's stages, registered in pipeline order.

Each stage module defines a config dataclass, a VERSION and a `run(cfg, inputs, out_dir, ctx)` function; this
registry is what `gptline run` executes.

The config group `base_model` picks where the base model and the tokenizer come from. With `base_model=hf`, the
`import` stage's artifact fills the "tokenizer" input of tokenize, pretrain and sft, and the "pretrain" input (the
base model) of sft and evaluate; the tokenizer and pretrain stages are then not built, unless
`base_model.continue_pretraining=true` has pretrain continue the imported model (its "base_model" input) and sft
start from that.

The key `alignment` picks the alignment stages on the sft model (ppo by default; dpo; several at once, e.g.
`alignment=[ppo,dpo]`): each chosen one is built and fills its own input of evaluate, which compares them all.
"""

from pipeline.dag import InputChoice, StageChoice, StageResources, StageSpec
from stages import crawl_mix, dpo, evaluate, fetch, grpo, import_hf, ppo, pretrain, rm, sft, tokenize, tokenizer

IMPORTED = {"base_model.source": "hf"}
TOKENIZER = InputChoice("tokenizer", "tokenizer", ((IMPORTED, "import"),))
BASE_MODEL = InputChoice("pretrain", "pretrain", (({**IMPORTED, "base_model.continue_pretraining": False}, "import"),))
CONTINUED = InputChoice("base_model", None, (({**IMPORTED, "base_model.continue_pretraining": True}, "import"),))
# The alignment stages, alternatives on the same sft model: `alignment=dpo`, `alignment=[ppo,dpo,grpo]`; evaluate
# compares every one chosen. A new one is a name here (and its StageSpec below).
ALIGNMENT = StageChoice("alignment", ("ppo", "dpo", "grpo"), default=("ppo",))
# grpo reads the reward model only when it is its reward.
GRPO_RM = InputChoice("rm", None, (({"grpo.reward": "model"}, "rm"),))

REGISTRY: list[StageSpec] = [
    StageSpec("fetch", fetch.run, fetch.FetchConfig, version=fetch.VERSION),
    StageSpec(
        "import",
        import_hf.run,
        import_hf.BaseModelConfig,
        config_key="base_model",
        version=import_hf.VERSION,
        identity=import_hf.identity,
    ),
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
        inputs=("crawl_mix", TOKENIZER),
        version=tokenize.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        report=tokenize.report,
    ),
    StageSpec(
        "pretrain",
        pretrain.run,
        pretrain.PretrainConfig,
        inputs=(TOKENIZER, "tokenize", CONTINUED),
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
        inputs=(BASE_MODEL, TOKENIZER, "fetch"),
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
        "dpo",
        dpo.run,
        dpo.DPOConfig,
        inputs=("sft", "fetch"),
        version=dpo.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        stops_on_request=True,
        report=dpo.report,
    ),
    StageSpec(
        "grpo",
        grpo.run,
        grpo.GRPOConfig,
        inputs=("sft", "fetch", GRPO_RM),
        version=grpo.VERSION,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
        starts_workers=True,
        stops_on_request=True,
        report=grpo.report,
    ),
    StageSpec(
        "evaluate",
        evaluate.run,
        evaluate.EvaluateConfig,
        inputs=(BASE_MODEL, "sft", "rm", "tokenize", "fetch", *ALIGNMENT.inputs()),
        version=evaluate.VERSION,
        resources=StageResources(num_cpus=2.0),  # one process; torch uses this many threads
        report=evaluate.report,
    ),
]
