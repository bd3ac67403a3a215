#!/usr/bin/env bash
# The long-form reliability run, in --release: the randomized stress against
# the reference model (STRESS_CALLS, default 10^6 calls; `cargo test` in debug
# runs the same 10^6 default in a few seconds), the misuse tests with 10^5
# channels, and the API-sequence fuzzer with more cases.
#
#   ci/stress.sh
#   STRESS_CALLS=100000000 STRESS_SEED=123 PROPTEST_CASES=100000 ci/stress.sh
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
export STRESS_CALLS="${STRESS_CALLS:-1000000}"
export PROPTEST_CASES="${PROPTEST_CASES:-5000}"
export MISUSE_CHANNELS="${MISUSE_CHANNELS:-100000}"
set +e
cargo test --release -p callcancel --test stress --test model_fuzz --test misuse --test panics \
  -- --nocapture 2>&1 | grep -E '^(test |test result|stress:|model_fuzz:|misuse:)|panicked|FAILED|replay'
status=${PIPESTATUS[0]}
set -e
echo "stress: ci/stress.sh finished in $((SECONDS - t0)) s (exit $status)"
exit "$status"
