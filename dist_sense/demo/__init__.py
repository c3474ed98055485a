"""The demo's data: WordNet 3.0 from Debian's package, turned into corpora and a run config."""
