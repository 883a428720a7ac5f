#!/usr/bin/env bash
# GPU proof kit, run ON THE GPU HOST from the repository root (the working tree + the carried .gpu-kit/ folder):
#   bash benchmarks/gpu/run.sh            # installs the carried wheels into /tmp/site, runs proof.py --mode gpu
# Prints one JSON object (last line) and writes $OUT/gpu_proof.json + $OUT/proof-logs.tgz when OUT is set.
# Prepare .gpu-kit/ first on a machine with PyPI: .venv/bin/python benchmarks/gpu/fetch_wheels.py
set -u
KIT=${KIT:-.gpu-kit}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/ellama-proof}
PY=${PY:-python3}
[ -d "$KIT/wheels" ] || { echo "no $KIT/wheels: run benchmarks/gpu/fetch_wheels.py where PyPI is reachable, carry $KIT" >&2; exit 2; }
t0=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/wheels/*.whl || exit 3
echo "[kit] wheels installed into $SITE in $(( $(date +%s) - t0 )) s" >&2
export PYTHONPATH="$SITE:$PWD/benchmarks/gpu/compat:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw --format=csv >&2 || true
rm -rf "$WORK"
"$PY" benchmarks/gpu/proof.py --mode gpu --inputs "$KIT/inputs" --work "$WORK" --budget-s "${BUDGET_S:-330}" "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
  (cd "$WORK" && find . \( -name '*.log' -o -name 'metrics.jsonl' -o -name 'resume.json' -o -name 'ellama_*.json' \) \
     -print0 | tar czf "$OUT/proof-logs.tgz" --null -T -) 2>/dev/null || true
fi
exit $rc
