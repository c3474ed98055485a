"""Stage 2: RUN/hidden/ -> RUN/dictionary/ by MPI k-means (plan: tiles and settings; spill: rows
bucketed by tile; stage: the tile loop; finish: examples and shards in batches)."""
from dist_sense.stages.build_dict.stage import run

__all__ = ["run"]
