#!/usr/bin/env bash
# One call on the lent GPU machine: prepare it, run timed steps within a time budget, and return few files.
#
#   bash benchmarks/gpu_call.sh BUDGET_S 'TIMEOUT_S COMMAND' ['TIMEOUT_S COMMAND' ...]
#
# e.g. bash benchmarks/gpu_call.sh 560 '60 python3 -u benchmarks/gemm_alignment.py' \
#        '300 python3 -u benchmarks/backbone_speed.py --models T --cuda-graph --steps 10'
#
# Run from the repository root with `.whl/` (the OpenMMLab wheels and the mmcv CUDA build) and `.gpu_shared/`
# carried (benchmarks/README.md). Before the steps: Triton's cache is unpacked from
# `.gpu_shared/triton_cache.tgz.part*` where the cache was made (its entries name absolute paths) and
# `tools/gpu_env.sh` installs the stack. Each step then runs under its own timeout, cut to what is left of
# BUDGET_S (seconds since the script started); a step that cannot get 10 s is skipped, and said so. A step
# may start background processes and `wait` for them (compile warm-ups side by side).
#
# What comes back, in $OUT: `calls.log` (every step's output, its exit status and the seconds elapsed, in
# order), `card.txt`, and Triton's cache trimmed to what skips a compile (binaries, metadata, launchers) as
# `triton_cache.tgz.part*`. The run tool returns about eight files at most: steps should print to stdout, not
# write files of their own under $OUT.
set -uo pipefail
budget=$1
shift
# A step without its timeout would fail only after the setup (a call's start and the stack's install): refuse it now.
for step in "$@"; do
  if ! [[ ${step%% *} =~ ^[0-9]+$ ]]; then
    echo "gpu_call.sh: a step must start with its timeout in seconds ('TIMEOUT_S COMMAND'), got: ${step:0:80}" >&2
    exit 2
  fi
done
start=$(date +%s)
log=$OUT/calls.log
export TRITON_CACHE_DIR=/tmp/triton_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
mkdir -p "$TRITON_CACHE_DIR"
if ls .gpu_shared/triton_cache.tgz.part* >/dev/null 2>&1; then
  cat .gpu_shared/triton_cache.tgz.part* | tar -xz -C "$TRITON_CACHE_DIR" || echo "triton cache: unpacked with errors" >>"$log"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$OUT/card.txt" 2>&1
bash tools/gpu_env.sh .whl /tmp/site >>"$log" 2>&1
export PYTHONPATH=/tmp/site
echo "== setup done at $(( $(date +%s) - start )) s" >>"$log"
for step in "$@"; do
  limit=${step%% *}
  command=${step#* }
  left=$(( budget - ($(date +%s) - start) ))
  if (( left < 10 )); then
    echo "== skipped (budget spent): $command" >>"$log"
    continue
  fi
  (( limit > left )) && limit=$left
  echo "== $command (timeout $limit s)" >>"$log"
  timeout "$limit" bash -c "$command" >>"$log" 2>&1
  echo "== exit $? at $(( $(date +%s) - start )) s" >>"$log"
done
cd "$TRITON_CACHE_DIR" && python3 - <<'PY'
import glob, json
for group in glob.glob('*/__grp__*.json'):
    data = json.load(open(group))
    data['child_paths'] = {k: v for k, v in data['child_paths'].items() if k.endswith(('.cubin', '.json', '.so'))}
    json.dump(data, open(group, 'w'))
PY
find . -type f \( -name '*.cubin' -o -name '*.json' -o -name '*.so' \) | tar -cz -T - | split -b 15M - "$OUT/triton_cache.tgz.part"
echo "== done at $(( $(date +%s) - start )) s" >>"$log"
grep -v "Warning\|pkg_resources\|_bootstrap\|warnings.warn" "$log" | tail -60
