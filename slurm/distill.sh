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
#   DIST_SENSE_PEER_TIMEOUT        seconds without a peer's heartbeat before it counts as lost (default 120)
#   DIST_SENSE_COLLECTIVE_TIMEOUT  torch.distributed rendezvous and collective timeout (default 600)
# Extra arguments are key=value config overrides passed to both stages.
# Both stages resume: resubmitting the same job continues where the last one stopped.
# Submit from the repository root (the job runs in $SLURM_SUBMIT_DIR).
#
# Stopping early: on SIGTERM distill saves a checkpoint at the next step and exits with code 3
# (0 = finished, 1 = a bug, 2 = an input error, 4 = a peer rank lost with its node); this script
# then exits 3 too: resubmit (or `scontrol requeue` a job submitted with --requeue) to resume.
# After exit 4 resubmit once the node is back (or --exclude it): distill resumes from its
# newest complete checkpoint, with the same number of ranks. The label stage has no handler:
# SIGTERM ends it, and its rerun resumes from its last closed shard.
# --signal=TERM@120 (no "B:") makes Slurm send SIGTERM to the tasks of every job step, i.e. the
# python ranks under srun, 120 s (Slurm may add up to 60 s) before the time limit. "B:TERM@120"
# would signal only this batch shell, which runs srun in the foreground and so neither passes
# the signal on nor runs a trap before srun returns: the ranks would get nothing until Slurm's
# own SIGTERM at the limit, KillWait (often 30 s) before its SIGKILL. Preemption and scancel
# send SIGTERM to the steps as well, with the same KillWait.
#
#SBATCH --job-name=dist_sense-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
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

STOPPED=3  # distill's exit code after SIGTERM: checkpoint saved, not finished (dist_sense/stages/distill/stopping.py)

# The deepspeed launcher outside Slurm, with SIGTERM to this script passed to the ranks. `deepspeed`
# itself (one node) has no SIGTERM handler: it dies and leaves its child launch.py and the ranks
# running. launch.py does pass SIGTERM on, but to one rank at a time, SIGKILLing each 30 s later,
# and exits 1 whatever the ranks did (DeepSpeed 0.19). So the ranks, the children of launch.py,
# are signalled directly: they stop at the next step with a checkpoint and deepspeed exits 3.
run_deepspeed() {
  "$DEEPSPEED" "$@" &
  local runner=$! rc=0 stopping=0
  # shellcheck disable=SC2064
  trap "stopping=1; pkill -TERM -P \"\$(pgrep -d, -P $runner)\" || true" TERM
  wait "$runner" || rc=$?
  while (( stopping == 1 )); do  # the trap interrupted wait: wait for the launcher's own exit code
    stopping=2 rc=0
    wait "$runner" || rc=$?
  done
  trap - TERM
  return "$rc"
}

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
  rc=0
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # One task per GPU; dist_sense.comm reads SLURM_PROCID/SLURM_NTASKS and the first host.
    # shellcheck disable=SC2086
    srun --kill-on-bad-exit=1 "$PYTHON" "launcher/$stage.py" $args "$@" || rc=$?
  else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
      export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    fi
    DEEPSPEED=$(dirname "$PYTHON")/deepspeed
    [[ -x "$DEEPSPEED" ]] || DEEPSPEED=deepspeed
    PORT=${MASTER_PORT:-$("$PYTHON" -c 'from dist_sense.comm import free_port; print(free_port())')}
    # shellcheck disable=SC2086
    run_deepspeed --num_gpus "${NPROC:-2}" --master_port "$PORT" "launcher/$stage.py" $args "$@" || rc=$?
  fi
  if [[ "$stage" == distill && "$rc" == "$STOPPED" ]]; then
    echo "== distill stopped by SIGTERM with a checkpoint (exit $STOPPED): run this job again to resume: $(date)"
    exit "$STOPPED"
  fi
  [[ "$rc" == 0 ]] || exit "$rc"
done
echo "== done: $(date)"
