"""Run under `deepspeed --num_gpus 2`: all-reduce check, then a ZeRO-3 teacher forward in lockstep.

Rank r gets r+1 batches of the fixed inputs (so ranks are uneven), every rank writes
the hidden states it kept to OUT/hidden-rank{r}.npy, rank 0 writes OUT/allreduce.json.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dist_sense import comm
from dist_sense.config import ModelConfig
from dist_sense.model.teacher import Teacher, run_lockstep


def main(model_dir: str, out_dir: str) -> None:
    env = comm.init_torch()
    summed = comm.all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    teacher = Teacher(ModelConfig(teacher=model_dir), "tests/ds_z3_partition_all.json", micro_batch=2)
    assert teacher.partitioned
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])
    mask = (ids != 0).long()
    kept = [h.numpy() for _, h in run_lockstep(teacher, [(ids, mask)] * (env.rank + 1), lambda b: b, 2)]
    out = Path(out_dir)
    np.save(out / f"hidden-rank{env.rank}.npy", np.stack(kept))
    if env.rank == 0:
        (out / "allreduce.json").write_text(json.dumps({"sum": summed.item(), "world": env.world_size}))
    # Ends gloo's threads before the interpreter does: left to exit, one sometimes aborted the rank
    # ("terminate called without an active exception", exit 250) after all the work was done.
    comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*args)
