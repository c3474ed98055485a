"""Batched per-token k-means and MCL: pure maths on numpy or cupy arrays.

Nothing here imports MPI or torch.distributed: `cluster_tile` takes a `Comm`
(dist_sense.comm: LocalComm for one process) for its few host-array collectives.
"""
