#!/usr/bin/env bash
# GPU first light: the one command for a fresh GPU box (the device tool's H200: torch, triton, transformers, no
# diffusers, no registry). Installs ipa_rt with --no-deps plus the wheels benchmarks/gpu/wheels.sh fetched (in
# .whl/ at the repository root, or WHEELS=DIR), then runs every stage of first_light.py, time-boxed, writing
# first-light.{json,md,log} into OUT as each stage lands. Ends by itself within the budget (default 540 s).
#
#   IPA_RT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu/first_light.sh OUT [--budget S] [--stages a,b]
#   bash benchmarks/gpu/first_light.sh OUT --rehearse      # CPU, tiny models, ~1.5 min (the test suite runs it)
set -uo pipefail
OUT=${1:?usage: first_light.sh OUT [--rehearse] [--budget SECONDS] [--stages LIST]}
shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/first-light.log"
echo "=== first light $(date -Is) in $ROOT, python $($PY --version 2>&1)" >>"$LOG"

# ipa_rt and the carried wheels into one private site folder: the image's own packages stay as they are
SITE=${IPA_RT_SITE:-$(mktemp -d /tmp/ipa_rt-site.XXXXXX)}
WHEELS=${WHEELS:-$ROOT/.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >>"$LOG" 2>&1 || echo "=== wheel install failed (see above)" >>"$LOG"
fi
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" "$ROOT" \
        >>"$LOG" 2>&1; then
    echo "=== pip could not install ipa_rt: running it from the source tree" >>"$LOG"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export IPA_RT_CACHE=${IPA_RT_CACHE:-$SITE/cache}   # a fresh tuning cache: the run measures what tuning costs
exec $PY "$ROOT/benchmarks/gpu/first_light.py" "$OUT" "$@"
