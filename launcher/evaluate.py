"""Stage 4: evaluate the dictionary and the students -> RUN/eval/ (metrics.json, report.md).

    python launcher/evaluate.py run_dir=RUN [key=value ...]       (reuses RUN/config.json)
    python launcher/evaluate.py --config CONFIG [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_sense.cli import run_stage  # noqa: E402
from dist_sense.stages import evaluate

if __name__ == "__main__":
    run_stage(__doc__, evaluate.run)
