"""One module or package per pipeline stage, each with `run(cfg) -> Path`:
counts/extract (teacher pass), build_dict (MPI k-means), label (teacher pass),
distill (DeepSpeed student), evaluate. Stages talk only through files in the run directory."""
