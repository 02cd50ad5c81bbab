"""gptline's library and command line.

- `gptline.model`: the model (nothing else), KV-cache sampling, the Hugging Face export;
- `gptline.training`: the training-stage abstraction (loaders, engine, checkpoints, the loop);
- `gptline.data`: readers, filters, dedup keys, the chat template and the file formats stages share;
- `gptline.cli`: the `gptline` command.

The library packages know nothing of Ray scheduling or of the artifact store; `stages/` builds the recipe on them and
`pipeline/` runs it.
"""
