#!/usr/bin/env bash
# Interleaved runs of the three loaders of a bf16 checkpoint into f32 (docs/benchmarks.md):
#   crates/peftkit-burn/benches/load_compare.sh DIR [ROUNDS]
# DIR: a single-file bf16 Llama checkpoint (burn-store's SafetensorsStore reads no sharded
# index). Needs the release bench built (cargo bench -p peftkit-burn --bench load --no-run)
# and the interop venv. Prints "tool seconds user sys peak_rss_mb" per run: seconds, user and
# sys are the load's (or save_hf's, for `save`) alone, measured inside each process ("-" for
# transformers), peak RSS is the whole process's (/usr/bin/time).
# TOOLS picks the contenders (default "peftkit store transformers"; `save` times save_hf);
# BENCH another build of the bench binary (to compare two builds, with TAG naming each).
set -euo pipefail
dir=$1
rounds=${2:-3}
repo=$(cd "$(dirname "$0")/../../.." && pwd)
bench=${BENCH:-$(ls -t "$repo"/target/release/deps/load-* | grep -v '\.d$' | head -1)}
tools=${TOOLS:-peftkit store transformers}
py=${PEFTKIT_VENV:-$HOME/.cache/peftkit/venv}/bin/python
tf='import sys, time, torch
from transformers import AutoModelForCausalLM
t = time.time()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(f"transformers: load {time.time() - t:.2f} s")'
for _ in $(seq "$rounds"); do
  for tool in $tools; do
    if [ "$tool" = transformers ]; then
      cmd=("$py" -c "$tf" "$dir")
    else
      cmd=("$bench" "$dir" "$tool")
    fi
    out=$(CUDA_VISIBLE_DEVICES="" /usr/bin/time -f "rss_kb %M" "${cmd[@]}" 2>&1)
    secs=$(echo "$out" | grep -oP '(load|save) \K[0-9.]+')
    user=$(echo "$out" | grep -oP 'user \K[0-9.]+' || echo -)
    sys=$(echo "$out" | grep -oP 'sys \K[0-9.]+' || echo -)
    rss=$(echo "$out" | grep -oP 'rss_kb \K[0-9]+')
    echo "${TAG:-}$tool $secs $user $sys $((rss / 1024))"
  done
done
