"""`medtune pipeline`: pt -> merge -> sft -> merge -> dpo -> merge -> eval on one command, each step fed by the
previous one's output, resumable, with results, a manifest and a report.

config      the pipeline YAML (one section per stage, parsed by the stage's own dataclasses) and command line
state       pipeline_state.json: what each step ran with, skip / resume / re-run decisions, progress lines
evaluation  base and every stage's model through `medtune eval`, on identical items
summary     data summary, run_manifest.json, pipeline_results.json
run         the orchestration
"""

from medtune.pipeline.run import main

__all__ = ["main"]
