"""The whole product in one command: prune -> train -> eval -> report (``semisparse run``)."""

from semisparse.pipeline.config import PRESETS, PipelineConfig, build_config
from semisparse.pipeline.runner import PIPELINE_FILE, PipelineResult, plan, run_pipeline
from semisparse.pipeline.stages import STAGE_ORDER, STAGES, Context

__all__ = ["PIPELINE_FILE", "PRESETS", "STAGES", "STAGE_ORDER", "Context", "PipelineConfig", "PipelineResult",
           "build_config", "plan", "run_pipeline"]
