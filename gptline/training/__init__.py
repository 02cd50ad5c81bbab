"""The training-stage abstraction pretrain, sft, rm, dpo and ppo share.

`driver.train` (on the driver) hands a stage's recipe to its worker group inside a `worker.WorkerSpec`;
`worker.run_worker` builds the engines and runs `fit.fit` around the recipe's task; `supervised` holds the
loss-based tasks, `preference` the preference losses (DPO, IPO, SimPO), `loaders` the data (packed token rows,
example batches, packing), `checkpoints`, `log`, `engine` (DeepSpeed, schedule, compile), `config` (the shared
knobs) and `collectives` the rest.
"""
