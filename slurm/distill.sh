#!/usr/bin/env bash
# Labelling, then distillation: the teacher labels RUN/labels (ZeRO-3), then a student is
# distilled against them (ZeRO-2, data parallel over every GPU of the job).
#
#   CONFIG=my.json sbatch slurm/distill.sh
#   CONFIG=my.json sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 slurm/distill.sh distill.steps=5000
#   CONFIG=my.json NPROC=2 bash slurm/distill.sh    # outside Slurm: this machine, deepspeed launcher
#
# Environment (CONFIG is required, the rest have defaults):
#   CONFIG      run config JSON                              (required)
#   DS_CONFIG   DeepSpeed engine JSON of the student         (default ds_configs/z2.json)
#   STAGES      which stages to run, in order                (default "label distill")
#   PYTHON      interpreter                                   (default .venv/bin/python if present, else python)
#   NPROC       processes outside Slurm                       (default 2)
#   DS_ACCELERATOR  cpu or cuda; outside Slurm, cpu when nvidia-smi finds no GPU
# Extra arguments are key=value config overrides passed to both stages.
# Both stages resume: resubmitting the same job continues where the last one stopped.
# Submit from the repository root (the job runs in $SLURM_SUBMIT_DIR).
#
#SBATCH --job-name=dist_sense-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
CONFIG=${CONFIG:?set CONFIG to the run config JSON, e.g. CONFIG=my.json sbatch slurm/distill.sh}
DS_CONFIG=${DS_CONFIG:-ds_configs/z2.json}
STAGES=${STAGES:-label distill}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}

stage_args() {  # the command line of one stage after the script name
  case "$1" in
    label)   echo "--config $CONFIG" ;;
    distill) echo "--deepspeed $DS_CONFIG --config $CONFIG" ;;
    *)       echo "unknown stage '$1' in STAGES (use label, distill)" >&2; exit 2 ;;
  esac
}

for stage in $STAGES; do
  args=$(stage_args "$stage")
  echo "== $stage: $(date)"
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # One task per GPU; dist_sense.comm reads SLURM_PROCID/SLURM_NTASKS and the first host.
    # shellcheck disable=SC2086
    srun --kill-on-bad-exit=1 "$PYTHON" "launcher/$stage.py" $args "$@"
  else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
      export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    fi
    DEEPSPEED=$(dirname "$PYTHON")/deepspeed
    [[ -x "$DEEPSPEED" ]] || DEEPSPEED=deepspeed
    PORT=${MASTER_PORT:-$("$PYTHON" -c 'from dist_sense.comm import free_port; print(free_port())')}
    # shellcheck disable=SC2086
    "$DEEPSPEED" --num_gpus "${NPROC:-2}" --master_port "$PORT" "launcher/$stage.py" $args "$@"
  fi
done
echo "== done: $(date)"
