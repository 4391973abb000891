#!/usr/bin/env bash
# Every streaming verb of peftkit against `cp -r`, on this host: builds the inputs (once, in
# /tmp/peftkit-bench or $PEFTKIT_BENCH_WORK), builds peftkit in release mode, runs the
# contenders in interleaved rounds, records the host, and writes docs/benchmarks/verbs-HOST.json,
# docs/benchmarks/verbs-HOST.svg and this host's section of docs/benchmarks.md.
#
#   benches/run_all.sh            # every case, 7B included (1–1.5 h; ~30 GB free for 7B)
#   benches/run_all.sh --quick    # 1 GB cases only, 3 rounds (about 25 min; the FP8 merges are slow)
#   benches/run_all.sh --label "quiet machine" --cases merge-1gb,reshard --rounds 11
#
# Other options: see `benches/verbs_bench.py --help`. Needs the pinned Python venv
# (tests/interop/run.sh creates it; PEFTKIT_VENV overrides its path) for the data builders.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PEFTKIT_VENV:-$HOME/.cache/peftkit/venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "no Python venv at $venv: run tests/interop/run.sh once to create it" >&2
    exit 1
fi
work="${PEFTKIT_BENCH_WORK:-/tmp/peftkit-bench}"
echo "work folder: $work ($(df -h --output=avail "$(dirname "$work")" | tail -1 | tr -d ' ') free)"
export PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec "$venv/bin/python" benches/verbs_bench.py --work "$work" "$@"
