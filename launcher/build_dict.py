"""Stage 2: RUN/hidden/ -> RUN/dictionary/ by MPI k-means over tiles of tokens.

    mpirun -n N python launcher/build_dict.py --config CONFIG [key=value ...]
    srun --mpi=pmi2 python launcher/build_dict.py --config CONFIG [key=value ...]
    python launcher/build_dict.py --config CONFIG [key=value ...]        (one process)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_sense import build_dict, dist  # noqa: E402
from dist_sense.cli import parse_run_config  # noqa: E402
from dist_sense.config import ConfigError  # noqa: E402
from dist_sense.dictionary import DictionaryError  # noqa: E402
from dist_sense.manifest import ManifestError  # noqa: E402
from dist_sense.shards import ShardError  # noqa: E402

INPUT_ERRORS = (ConfigError, ManifestError, ShardError, DictionaryError)


def main() -> None:
    cfg = parse_run_config(__doc__)
    env = dist.detect()
    try:
        out = build_dict.run(cfg)
    except Exception as err:
        print(f"error [rank {env.rank}]: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        if env.world_size > 1:
            dist.mpi_comm().Abort(2)  # the other ranks may wait in a collective: end the whole job
        if isinstance(err, INPUT_ERRORS):
            raise SystemExit(2) from None
        raise
    if env.rank == 0:
        print(out)


if __name__ == "__main__":
    main()
