#!/usr/bin/env bash
# Issue 13's results on the CPU testbed's student: the default student of results/precision-and-kl/
# (adapted all-MiniLM-L6-v2 teacher, 3-layer student from its layers 0,2,4, distilled 150 x 32 x 128
# WikiText-2 tokens under bf16 autocast). RUN = that run's folder (distilkit reproduce --preset
# results/precision-and-kl/config.yaml --data-dir ../shared/data --out runs/parity). Run from the repo root.
# What ran here (2-core AMD EPYC Zen 4, avx512_bf16; the exports and the SST-2 fine-tune while the
# parity run's last fine-tunings shared the cores; bench on the quiet machine, load 1.7):
set -euo pipefail
RUN=${RUN:-runs/parity}; D=${D:-runs/deploy}; DATA=../shared/data
export DISTILKIT_NO_PROGRESS=1
OMP_NUM_THREADS=1 distilkit finetune --model $RUN/distill/final --task sst2 --data-dir $DATA --out $D/sst2 \
    --max-train 6000 --epochs 1 --lr 1e-4 --batch-size 16 --seeds 1 --overwrite                       # 53 s
OMP_NUM_THREADS=1 distilkit export --model $RUN/finetune/student/mrpc/model --out $D/onnx-mrpc --int8 \
    --task mrpc --data-dir $DATA --overwrite --threads 1                                               # 33 s
OMP_NUM_THREADS=1 distilkit export --model $D/sst2/model --out $D/onnx-sst2 --int8 --task sst2 \
    --data-dir $DATA --overwrite --threads 1                                                           # 25 s
distilkit bench --teacher $RUN/teacher --student $RUN/distill/final --task stsb --data-dir $DATA \
    --max-sentences 500 --rounds 3 --threads 2 --out $D/bench.json                                     # 77 s
