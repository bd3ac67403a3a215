#!/usr/bin/env bash
# Instructions per call under callgrind, for callcancel and its peers:
# deterministic counts that repeat exactly, unlike wall times on a shared VM.
#
#   ci/callgrind.sh            # N=100000 for the loops, 100000 calls per abort
#   N=20000 ci/callgrind.sh    # quicker
#
# The driver loops live in examples/callgrind_driver.rs. Only the functions
# named `measured_*` (the loop itself, set-up and tear-down excluded) are
# counted: --collect-atstart=no plus --toggle-collect. The result is the
# instruction count ("Ir") divided by N.
#
# Not part of CI (.ci/run): the numbers are for BENCHMARKS.md.
set -euo pipefail
IFS=$'\n\t'
cd "$(dirname "$0")/.."

N=${N:-100000}
ABORT_N=${ABORT_N:-$N}

if ! command -v valgrind >/dev/null 2>&1; then
  echo "callgrind.sh: valgrind is not installed; trying apt-get install -y valgrind" >&2
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo -n)
  fi
  if ! { "${sudo_cmd[@]}" apt-get install -y valgrind >&2 ||
    { "${sudo_cmd[@]}" apt-get update >&2 && "${sudo_cmd[@]}" apt-get install -y valgrind >&2; }; }; then
    echo "callgrind.sh: SKIPPED: valgrind is missing and could not be installed" >&2
    echo "callgrind.sh: install valgrind (e.g. apt-get install valgrind) and re-run" >&2
    exit 0
  fi
fi

cargo build --release --example callgrind_driver >&2
target_dir=${CARGO_TARGET_DIR:-target}
bin="$target_dir/release/examples/callgrind_driver"
out_dir=$(mktemp -d)
trap 'rm -rf "$out_dir"' EXIT

# ir MODE N: instructions executed inside measured_* for one run.
ir() {
  local mode=$1 n=$2 out="$out_dir/$1.out"
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    --collect-atstart=no --toggle-collect='*measured_*' \
    "$bin" "$mode" "$n" >/dev/null 2>"$out_dir/$mode.log" || {
    cat "$out_dir/$mode.log" >&2
    return 1
  }
  # The "totals:" line (or "summary:" on older valgrind) holds Ir first.
  awk '/^(totals|summary):/ { print $2; exit }' "$out"
}

printf '%-28s %10s %16s %12s\n' "loop" "n" "instructions" "Ir per call"
# row LABEL MODE N [CALLS]: CALLS (default N) is how many operations the
# measured functions ran.
row() {
  local label=$1 mode=$2 n=$3 calls=${4:-$3} total
  total=$(ir "$mode" "$n")
  awk -v l="$label" -v n="$calls" -v t="$total" \
    'BEGIN { printf "%-28s %10d %16d %12.1f\n", l, n, t, t / n }'
}

row "lifecycle callcancel" lifecycle-callcancel "$N"
row "lifecycle callcancel host" lifecycle-callcancel-host "$N"
row "lifecycle tokio-util" lifecycle-tokio-util "$N"
row "lifecycle floor" lifecycle-floor "$N"
row "is_cancelled callcancel" is-cancelled-callcancel "$N"
row "is_cancelled tokio-util" is-cancelled-tokio-util "$N"
row "abort callcancel" abort-callcancel "$ABORT_N"
row "abort tokio-util" abort-tokio-util "$ABORT_N"
row "abort vec floor" abort-vec "$ABORT_N"
# begin_call while calls pile up on one channel: two measured begin_calls per
# 100 begun. Flat from the first row to the second means O(1) per begin_call;
# doubling means it scans the calls in flight.
row "begin_call, <=5k in flight" begin-call-with-n-in-flight 5000 100
row "begin_call, <=10k in flight" begin-call-with-n-in-flight 10000 200
# Completing n calls of a channel whose host and channel handles were
# dropped: flat from 2k to 4k means O(1) per completion.
row "complete, orphaned, 2k" complete-orphaned 2000
row "complete, orphaned, 4k" complete-orphaned 4000

# W1 and W3 per connection (the instructions; W1's target is a wall-time
# ratio, in benches/workload.rs): open_channel, k lifecycles, fault, drop
# against a child token, k children, cancel, drop; open + drop alone.
CONN_N=$((N / 10))
row "churn k=1 callcancel" churn-callcancel-1 "$CONN_N"
row "churn k=1 tokio-util" churn-tokio-util-1 "$CONN_N"
row "churn k=10 callcancel" churn-callcancel-10 "$CONN_N"
row "churn k=10 tokio-util" churn-tokio-util-10 "$CONN_N"
row "open + drop callcancel" open-drop-callcancel "$N"
row "open + drop tokio-util" open-drop-tokio-util "$N"

# P4: is_cancelled() should be one acquire load (on x86-64 a plain `mov`,
# with no `lock` prefix). It is inlined into the measured loop, so show that
# loop's machine code when objdump is available.
if command -v objdump >/dev/null 2>&1; then
  echo
  echo "measured_is_cancelled_callcancel (is_cancelled inlined):"
  objdump -d --no-show-raw-insn -C "$bin" |
    awk '/<callgrind_driver::measured_is_cancelled_callcancel>:/ { p = 1; next } p && /^$/ { exit } p && !/int3/ { print }'
fi
