"""`python -m dist_sense.demo --run-dir RUN`: write the demo's corpora and config."""
from dist_sense.demo.prepare import main

main()
