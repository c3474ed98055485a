"""dist_sense: multi-sense embeddings and sense distillation, distributed on DeepSpeed and MPI.

`from dist_sense import SenseEncoder` is the entry point for using a finished run;
the stages live in dist_sense.stages (each `run(cfg)`), launched through dist_sense.cli.
README.md's Layout section maps the folders.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import dist_sense.config` does not pull in torch and transformers.
    if name in ("SenseEncoder", "EncodedText"):
        from dist_sense.model import encoder
        return getattr(encoder, name)
    raise AttributeError(f"module 'dist_sense' has no attribute {name!r}")
