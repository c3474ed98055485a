"""Stage 4: metrics, probes, figures and the report of a finished run."""
from dist_sense.stages.evaluate.stage import run

__all__ = ["run"]
