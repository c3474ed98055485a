"""Batched per-token k-means and MCL: pure maths on numpy or cupy arrays.

Nothing here imports MPI or torch.distributed: `cluster_tile` takes any `Comm` (rank,
world, allreduce, allgather: dist_sense.comm's LocalComm and MpiComm are ones; the
default ONE_PROCESS is a world of one) for its few host-array collectives.

Modules, lowest first: groups (positions within runs, size classes), types (Comm,
LocalTile, TileRun, Centres, TileResult), subsample (the shared subsample), distinct (the
senses of tokens with few vectors), mcl (k under k_policy=mcl), start (k-means++,
re-seeding), exact (layout-independent sums), lloyd (the iterations), tile (make_local_tile, cluster_tile).
"""
from dist_sense.kmeans.distinct import DistinctSenses, distinct_senses
from dist_sense.kmeans.groups import rank_in_group
from dist_sense.kmeans.tile import cluster_tile, make_local_tile, nearest_rows_per_sense, with_distinct_senses
from dist_sense.kmeans.types import ONE_PROCESS, Comm, LocalTile, TileResult

__all__ = ["ONE_PROCESS", "Comm", "DistinctSenses", "LocalTile", "TileResult", "cluster_tile", "distinct_senses",
           "make_local_tile", "nearest_rows_per_sense", "rank_in_group", "with_distinct_senses"]
