#!/usr/bin/env bash
# Interleaved runs of the three loaders of a bf16 checkpoint into f32 (docs/benchmarks.md):
#   crates/peftkit-burn/benches/load_compare.sh DIR [ROUNDS]
# DIR: a single-file bf16 Llama checkpoint (burn-store's SafetensorsStore reads no sharded
# index). Needs the release bench built (cargo bench -p peftkit-burn --bench load --no-run)
# and the interop venv. Prints "tool seconds peak_rss_mb" per run: seconds is the load alone
# (timed inside each process), peak RSS is the whole process's (/usr/bin/time).
set -euo pipefail
dir=$1
rounds=${2:-3}
repo=$(cd "$(dirname "$0")/../../.." && pwd)
bench=$(ls -t "$repo"/target/release/deps/load-* | grep -v '\.d$' | head -1)
py=${PEFTKIT_VENV:-$HOME/.cache/peftkit/venv}/bin/python
tf='import sys, time, torch
from transformers import AutoModelForCausalLM
t = time.time()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(f"transformers: load {time.time() - t:.2f} s")'
for _ in $(seq "$rounds"); do
  for tool in peftkit store transformers; do
    if [ "$tool" = transformers ]; then
      cmd=("$py" -c "$tf" "$dir")
    else
      cmd=("$bench" "$dir" "$tool")
    fi
    out=$(CUDA_VISIBLE_DEVICES="" /usr/bin/time -f "rss_kb %M" "${cmd[@]}" 2>&1)
    secs=$(echo "$out" | grep -oP 'load \K[0-9.]+')
    rss=$(echo "$out" | grep -oP 'rss_kb \K[0-9]+')
    echo "$tool $secs $((rss / 1024))"
  done
done
