#!/bin/bash
# On a GPU node: the demo's pipeline on CUDA with NCCL, the teacher and the student in bf16.
# Tokens/s of each stage land in RUN/tb/<stage>; metrics in RUN/eval/metrics.json.
#   bash bench/gpu_pipeline.sh             # every GPU of the node
#   NGPU=1 RUN=runs/gpu bash bench/gpu_pipeline.sh
set -euo pipefail
RUN=${RUN:-runs/gpu_check}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
PORT=${PORT:-29517}
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1
python -m dist_sense.demo --run-dir "$RUN"
CFG="$RUN/demo.json"
TEACHER=(model.dtype=bf16 extract.partition=zero3)   # the same teacher settings for both teacher passes
# The tuned teacher first (GLUE setting: every later stage reads it); batches must divide by NGPU x micro batch.
deepspeed --num_gpus "$NGPU" --master_port "$PORT" launcher/finetune.py --deepspeed ds_configs/z2.json --config "$CFG" \
  finetune.global_batch_size=$((16 * NGPU)) finetune.micro_batch_size=16
deepspeed --num_gpus "$NGPU" --master_port "$PORT" launcher/extract.py --config "$CFG" "${TEACHER[@]}"
mpirun -n "$NGPU" python launcher/build_dict.py --config "$CFG"
deepspeed --num_gpus "$NGPU" --master_port "$PORT" launcher/label.py --config "$CFG" "${TEACHER[@]}"
# ds_configs/z2.json has bf16 "auto": on where CUDA is; the global batch must divide by NGPU x micro batch.
deepspeed --num_gpus "$NGPU" --master_port "$PORT" launcher/distill.py --deepspeed ds_configs/z2.json --config "$CFG" \
  distill.global_batch_size=$((16 * NGPU)) distill.micro_batch_size=16
deepspeed --num_gpus "$NGPU" --master_port "$PORT" launcher/finetune.py --deepspeed ds_configs/z2.json --config "$CFG" \
  finetune.backbone=student distill.global_batch_size=$((16 * NGPU)) distill.micro_batch_size=16
python launcher/evaluate.py --config "$CFG"
python -m bench.gpu_checks
