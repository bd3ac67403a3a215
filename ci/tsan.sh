#!/usr/bin/env bash
# ThreadSanitizer over the threaded tests: the randomized stress (smaller
# figure per loop), the threaded races, the reentrancy/panic/misuse tests and
# the async waiters. std is rebuilt with TSan (-Zbuild-std) so its own
# atomics and locks are instrumented too: no suppressions are needed or used.
#
#   ci/tsan.sh                      # TSAN_LOOPS=3 loops, different stress seeds
#   TSAN_LOOPS=10 TSAN_STRESS_CALLS=200000 ci/tsan.sh
#
# Exit status: 0 if clean (or SKIPPED: no nightly), non-zero on any report
# (TSan exits 66 on a data race) or failed test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  if ! rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
    echo "SKIPPED: tsan: no nightly toolchain available (rustup toolchain install nightly failed)"
    exit 0
  fi
fi
if ! rustup +nightly component list --installed 2>/dev/null | grep -q '^rust-src'; then
  if ! rustup component add --toolchain nightly rust-src; then
    echo "SKIPPED: tsan: the nightly toolchain has no rust-src (needed by -Zbuild-std)"
    exit 0
  fi
fi

target=$(rustc +nightly -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Zsanitizer=thread ${RUSTFLAGS:-}"
export RUSTDOCFLAGS="-Zsanitizer=thread"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/tsan"
# Any report fails the run, even one TSan would not otherwise count.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
loops=${TSAN_LOOPS:-3}
tests=(
  --test stress
  --test threaded_race
  --test r1_cancel_once
  --test r3_free_after_cancel
  --test r4_no_lost_cancel
  --test r5_first_reason
  --test a2_idle_close
  --test a3_reentrant
  --test a4_panics
  --test async_cancelled
  --test cancel_per_call
  --test panics
  --test misuse
)
t0=$SECONDS
cargo +nightly test -Zbuild-std --target "$target" --release -p callcancel "${tests[@]}" --no-run
echo "tsan: built in $((SECONDS - t0)) s"
total=0
for i in $(seq 1 "$loops"); do
  seed=$(( (RANDOM << 16) ^ RANDOM ^ (i << 40) ))
  echo "tsan: loop $i/$loops, STRESS_SEED=$seed"
  log=$(mktemp)
  set +e
  STRESS_SEED=$seed STRESS_CALLS=${TSAN_STRESS_CALLS:-100000} MISUSE_CHANNELS=${TSAN_CHANNELS:-10000} \
    cargo +nightly test -Zbuild-std --target "$target" --release -p callcancel "${tests[@]}" \
    -- --nocapture 2>&1 | tee "$log" | grep -E '^(test result|stress:|misuse:|WARNING: ThreadSanitizer|SUMMARY)|FAILED|panicked'
  status=${PIPESTATUS[0]}
  set -e
  n=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
  total=$((total + n))
  if [ "$status" -ne 0 ] || grep -q 'ThreadSanitizer' "$log"; then
    grep -A40 'WARNING: ThreadSanitizer' "$log" | head -120 || true
    echo "tsan: FAILED in loop $i (exit $status); replay the stress part with STRESS_SEED=$seed"
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
done
echo "tsan: clean: $loops loops, $total test runs passed, no reports; $((SECONDS - t0)) s"
