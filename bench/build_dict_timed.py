"""Run under mpirun: time build_dict.run after start-up and imports; rank 0 prints seconds as JSON.

Imports include torch's TensorBoard writer, which rank 0's k-means metrics load lazily: a
fixed ~2.5 s on this machine whatever the data, which would otherwise sit in both timings.
"""
import json
import sys
import time

import torch.utils.tensorboard  # noqa: F401  (see the docstring)

from dist_sense.comm import open_comm
from dist_sense.runtime.process import retain_freed_memory
from dist_sense.config import RunConfig
from dist_sense.stages.build_dict import stage as build_dict

cfg = RunConfig.load(None, sys.argv[1:])
retain_freed_memory()  # as the build_dict entry (cli.run_stage) sets it
comm = open_comm()
comm.barrier()
start = time.perf_counter()
build_dict.run(cfg)
comm.barrier()
if comm.rank == 0:
    print(json.dumps({"seconds": time.perf_counter() - start, "ranks": comm.world}))
