"""gptline's orchestration layer: artifacts, the stage DAG, the Ray runner, tracking and the CLI.

Nothing here knows what a stage computes; stages are plain functions registered in `stages`.
"""
