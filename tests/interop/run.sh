#!/usr/bin/env bash
# Live interop checks against the pinned reference stack (tests/interop/requirements.txt).
#
#   tests/interop/run.sh           fixture drift check, then build peftkit and let transformers and
#                                  peft load what it writes, against references computed here
#   tests/interop/run.sh --regen   regenerate tests/fixtures (and adapters-spec/tp_plans.json) with the
#                                  real libraries first
#
# The venv lives outside the repository (PEFTKIT_VENV, default ~/.cache/peftkit/venv) and holds
# exactly requirements.lock (every transitive package pinned; requirements.txt says what the
# lock was resolved from). It is rebuilt only when the lock changes. Everything runs on the CPU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${PEFTKIT_VENV:-$HOME/.cache/peftkit/venv}
stamp="$venv/.peftkit-requirements.sha256"
want=$(sha256sum "$here/requirements.lock" | cut -d' ' -f1)

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "interop: creating the reference venv in $venv (a few minutes, once)"
  python3 -m venv --clear "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$here/requirements.lock"
  "$venv/bin/pip" check --disable-pip-version-check
  echo "$want" > "$stamp"
fi

export PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ "${1:-}" = "--regen" ]; then
  "$venv/bin/python" "$here/make_fixtures.py"
  "$venv/bin/python" "$here/tp_plans.py"
else
  "$venv/bin/python" "$here/drift.py"
  # adapters-spec/tp_plans.json is what the pinned transformers gives
  "$venv/bin/python" "$here/tp_plans.py" --check
fi

cargo build --quiet --release --bin peftkit --manifest-path "$repo/Cargo.toml"
PEFTKIT_BIN="$repo/target/release/peftkit" "$venv/bin/python" "$here/live_checks.py"

# peftkit-burn: its example in the debug profile `cargo test` already built (a release build of
# burn would add minutes; the tiny models run in about a second either way).
cargo build --quiet -p peftkit-burn --example finetune_llama --manifest-path "$repo/Cargo.toml"
BURN_EXAMPLE="$repo/target/debug/examples/finetune_llama" "$venv/bin/python" "$here/burn_checks.py"
