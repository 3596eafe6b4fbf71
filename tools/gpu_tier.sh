#!/usr/bin/env bash
# Tier 4 on a GPU machine that has torch and Triton but no network: install the wheels that
# tools/build_wheels.sh made (carried as .wheels/, plus pure-Python dependencies in .whl/), then
#   tools/gpu_tier.sh info                 aiter info
#   tools/gpu_tier.sh tests PKG...         pytest -m gpu on those packages (all when none given)
#   tools/gpu_tier.sh bench FAMILY ARGS... that family's benchmark CLI, results under $OUT/FAMILY
# Logs go to $OUT (the device tool returns that folder).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
if [ ! -d /tmp/aiter-site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/aiter-site \
    .wheels/*.whl $(ls .whl/*.whl 2>/dev/null) || exit 1
fi
export PYTHONPATH=/tmp/aiter-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
cmd=${1:-info}; shift || true
case "$cmd" in
  info) python3 -m aiter_core info 2>&1 | tee "$OUT/info.txt" ;;
  tests)
    # Triton compiles each kernel specialization on the CPU: spread the tests over $SHARDS
    # processes (the GPU machine has 16 cores) and merge their logs.
    pkgs=("$@"); [ ${#pkgs[@]} -eq 0 ] && pkgs=($(ls packages))
    dirs=(); for p in "${pkgs[@]}"; do dirs+=("packages/$p/tests"); done
    tag=$(IFS=_; echo "${pkgs[*]}")
    shards=${SHARDS:-8}
    python3 -m pytest -m gpu -q --collect-only -p no:cacheprovider "${dirs[@]}" 2>/dev/null | grep "::" > "$OUT/ids_$tag.txt"
    split -n "r/$shards" "$OUT/ids_$tag.txt" "/tmp/shard_${tag}_"
    for f in /tmp/shard_${tag}_*; do
      mapfile -t ids < "$f"
      python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider "${ids[@]}" > "$f.log" 2>&1 &
    done
    wait
    cat /tmp/shard_${tag}_*.log > "$OUT/gpu_tests_$tag.log"
    grep -E "passed|failed" "$OUT/gpu_tests_$tag.log"
    crashed=0  # a shard without a pytest summary died (its failures are not listed): the tier fails
    for f in /tmp/shard_${tag}_*.log; do
      grep -qE "(passed|failed|no tests ran)" "$f" || { echo "$f ended without a pytest summary"; crashed=1; }
    done
    # The shards share one GPU: a test that fails there (out of memory, mostly) runs again alone,
    # and that run decides. Ids may hold spaces ("(12, 4)"): cut at " - ", the message separator.
    grep -hE "^(FAILED|ERROR) " /tmp/shard_${tag}_*.log | sed -E 's/^(FAILED|ERROR) //; s/ - .*$//' | sort -u > "$OUT/retry_$tag.txt"
    if [ ! -s "$OUT/retry_$tag.txt" ]; then
      grep -qE "passed" "$OUT/gpu_tests_$tag.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/gpu_tests_$tag.log"
      exit $(( $? || crashed ))
    fi
    echo "re-running $(wc -l < "$OUT/retry_$tag.txt") tests that failed in the shards, one process"
    mapfile -t ids < "$OUT/retry_$tag.txt"
    python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider "${ids[@]}" > "$OUT/gpu_tests_${tag}_retry.log" 2>&1
    status=$?
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests_${tag}_retry.log"
    exit $(( status || crashed )) ;;
  bench)
    fam=$1; shift
    python3 -m "aiter_${fam}.bench" --out "$OUT/$fam" "$@" 2>&1 | tee "$OUT/bench_$fam.log"
    exit "${PIPESTATUS[0]}" ;;
  *) echo "unknown command $cmd (info | tests | bench)"; exit 2 ;;
esac
