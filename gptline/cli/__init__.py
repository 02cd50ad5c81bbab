"""The `gptline` command: the pipeline's commands (run, resume, status, ...) and the model commands (chat, sample,
plan)."""
