#!/usr/bin/env bash
# Build the sense dictionary in one job: teacher extraction (ZeRO-3) -> RUN/hidden/,
# then MPI k-means -> RUN/dictionary/. Both stages resume, so resubmitting finishes a run.
#
#   CONFIG=run.json sbatch slurm/build_dict.sh                   # submit from the repository root
#   CONFIG=run.json sbatch --nodes=4 slurm/build_dict.sh kmeans.k=10 extract.cap=500
#   CONFIG=run.json NPROC=2 bash slurm/build_dict.sh             # no Slurm: this machine only
#
# Environment:
#   CONFIG        run config JSON (required)
#   NPROC         processes outside Slurm (default: the GPUs nvidia-smi lists, or 2 without any)
#   PYTHON        interpreter (default: python on PATH)
#   DEEPSPEED     launcher of extraction outside Slurm (default: deepspeed on PATH)
#   MPIRUN        launcher of k-means outside Slurm (default: mpirun on PATH)
#   SRUN_MPI      srun's MPI plugin for k-means (default: pmi2; pmix on some clusters)
#   SKIP_EXTRACT  1: skip extraction (RUN/hidden/ is complete), run k-means only
#   DIST_SENSE_PEER_TIMEOUT        seconds without a peer's heartbeat before it counts as lost (default 120)
#   DIST_SENSE_COLLECTIVE_TIMEOUT  torch.distributed rendezvous and collective timeout (default 600)
# Arguments after the script are key=value overrides, given to both stages.
# Under Slurm one task runs per GPU: --ntasks-per-node must equal --gpus-per-node.
# A node lost mid-run: the ranks that watch it exit with code 4 after DIST_SENSE_PEER_TIMEOUT
# and srun ends the step once Slurm declares the node down (SlurmdTimeout). Slurm requeues a
# batch job whose node failed unless it was submitted with --no-requeue; either way the rerun
# resumes (docs/operations.md, Across nodes).
#
# --signal=TERM@120 (no "B:"): SIGTERM to the tasks of every job step (the ranks under srun)
# 120 s (Slurm may add up to 60 s) before the time limit, as slurm/distill.sh asks for too;
# "B:TERM@120" would reach only this batch shell, which cannot pass it on while srun runs in
# the foreground. Extraction and k-means have no SIGTERM handler yet: the signal ends them as
# the limit would (a little sooner), and resubmitting resumes them from their progress files
# and finished tiles (docs/operations.md, Resuming).
#
#SBATCH --job-name=dist_sense_dict
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${CONFIG:?set CONFIG to the run config JSON}"
PYTHON=${PYTHON:-python}

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # sbatch runs a spooled copy of this file: the checkout is where the job was submitted.
    cd "${SLURM_SUBMIT_DIR}"
    echo "build_dict: job ${SLURM_JOB_ID}, ${SLURM_NNODES:-1} nodes, ${SLURM_NTASKS:-1} tasks, config ${CONFIG}"
    if [[ "${SKIP_EXTRACT:-0}" != 1 ]]; then
        srun --kill-on-bad-exit=1 "$PYTHON" launcher/extract.py --config "$CONFIG" "$@"
    fi
    srun --kill-on-bad-exit=1 --mpi="${SRUN_MPI:-pmi2}" "$PYTHON" launcher/build_dict.py --config "$CONFIG" "$@"
else
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    if [[ -z "${NPROC:-}" ]]; then
        NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        [[ "$NPROC" -gt 0 ]] || NPROC=2
    fi
    echo "build_dict: no Slurm job, ${NPROC} local processes, config ${CONFIG}"
    if [[ "${SKIP_EXTRACT:-0}" != 1 ]]; then
        port=${MASTER_PORT:-$("$PYTHON" -c 'from dist_sense.comm import free_port; print(free_port())')}
        "${DEEPSPEED:-deepspeed}" --num_gpus "$NPROC" --master_port "$port" launcher/extract.py --config "$CONFIG" "$@"
    fi
    "${MPIRUN:-mpirun}" -n "$NPROC" "$PYTHON" launcher/build_dict.py --config "$CONFIG" "$@"
fi
