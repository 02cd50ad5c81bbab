"""User-facing errors.

Every error a user can cause (bad config, bad input, a corrupted or missing artifact, an unreachable store) is a
`GptlineError`: the CLI prints its one-line message and exits 2, with the traceback only under `--debug`.
Anything else is a bug and keeps its traceback.
"""


class GptlineError(Exception):
    """An error the user can act on; its message names the file, record or config key concerned."""


class ConfigError(GptlineError):
    """A config key is unknown, mistyped or out of range."""


class DagError(GptlineError):
    """The stage graph is malformed (cycle, unknown stage) or a selection cannot be run."""


class StageStopped(GptlineError):
    """A stage checkpointed and stopped early because it was asked to (SIGTERM, a preemption notice); resuming the
    run continues from that checkpoint."""


class RunStopped(GptlineError):
    """The run was stopped by SIGTERM after its running stages checkpointed; `gptline resume` continues it."""


class StoreError(GptlineError):
    """The artifact store cannot be opened, written or read."""


class CorruptArtifactError(StoreError):
    """A committed file does not match its manifest (size or sha256)."""
