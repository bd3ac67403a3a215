#!/usr/bin/env bash
# The loom models of loom-tests/, one by one, each timed, with its preemption
# bound. Run from anywhere: `ci/loom.sh` (all models) or `ci/loom.sh FILTER`
# (models whose name contains FILTER).
#
# Flags: `--cfg loom` (callcancel's atomics, cells, locks and its AtomicWaker
# copy, src/loom_waker.rs, become loom's) and `-C debug-assertions` (the
# library's impossible-state asserts are live).
#
# Every model with `--cfg loom` (arc-swap is replaced by a loom stand-in,
# `src/sync.rs`).
# Two-thread models run unbounded (exhaustive); three-thread models with
# LOOM_MAX_PREEMPTIONS=3 (every interleaving with at most 3 forced switches;
# bugs that need more preemptions are not explored). The channel table's
# reclamation (a walker count and a limbo, `src/store/table.rs`) is on the
# crate's own atomics, so loom explores it in every model whose sweep walks
# the table (`reclaim`, `register_vs_abort`, ...); a second pass that ran
# crossbeam-epoch on loom's atomics is gone with crossbeam-epoch.
# Each model is timed; a table is printed at the end. Total on 2 cores: one
# loom build (about 1.5-3 min) plus a few minutes of models, inside the
# 15-minute budget.
set -euo pipefail
IFS=$'\n\t'
cd "$(dirname "$0")/.."

filter=${1:-}
base_dir=${CARGO_TARGET_DIR:-target/loom}
base_flags="${RUSTFLAGS:-} --cfg loom -C debug-assertions"

# pass file test bound ("-" = unbounded)
models="
loom register_vs_abort register_vs_host_abort -
loom register_vs_abort register_vs_abort_vs_complete -
loom register_vs_fault register_vs_channel_fault -
loom abort_vs_fault abort_vs_fault_same_call 3
loom cancel_vs_complete cancel_vs_complete_while_callback_runs -
loom cancel_vs_complete complete_vs_abort -
loom batched_finish fault_settles_vs_complete -
loom batched_finish fault_settles_two_calls_vs_completions 3
loom batched_finish fault_settles_vs_complete_vs_last_handle 3
loom two_aborts two_aborts_at_once 3
loom two_aborts two_faults_with_a_parked_watch 3
loom watch_reuse watch_repolled_across_slot_reuse 3
loom orphan last_handle_vs_finishing_free -
loom cancel_per_call cancel_vs_fault 3
loom cancel_per_call canceller_vs_complete_and_reuse 3
loom deadline deadline_vs_complete_and_reuse 3
loom deadline deadline_vs_cancel 3
loom deadline fault_waits_for_a_claimed_deadline_job 3
loom shrink stale_canceller_vs_shrink 3
loom review two_freers_last_handle_and_idle_waiter 3
loom review canceller_frees_vs_last_handle 3
loom review deadline_take_vs_complete_vs_last_handle 3
loom review stale_marked_wake_vs_reused_slot_waiter 3
loom review refused_begin_is_not_counted_cancelled 3
loom shrink begin_call_vs_shrink 3
loom shrink begin_call_in_a_new_segment_vs_fault -
loom shrink regrow_vs_shrink_vs_fault 3
loom begin_call_vs_abort begin_call_vs_host_abort -
loom begin_call_vs_abort begin_call_vs_channel_fault -
loom begin_call_vs_abort reused_slot_begin_call_vs_host_abort -
loom begin_call_vs_abort begin_call_vs_close -
loom begin_call_vs_abort two_first_calls_vs_host_abort 2
loom second_registration second_registration_vs_abort 3
loom cancelled_future cancelled_future_vs_abort -
loom cancelled_future two_cancelled_futures_vs_fault -
loom idle wait_idle_vs_last_completion 3
loom idle idle_future_vs_last_completion -
loom abort_in_callback abort_in_callback_vs_fault 3
loom reclaim channel_reclaimed_while_abort_sweeps -
loom reclaim slot_reused_while_fault_sweeps -
loom reclaim table_walk_vs_last_drop -
loom reclaim two_table_walks_vs_last_drop 3
loom reclaim two_drops_vs_table_walk 3
"

t0=$SECONDS
report=""
failed=0
IFS=$' \n\t'
built=""
while read -r pass file test bound; do
  [[ -z $pass ]] && continue
  [[ -n $filter && $test != *"$filter"* ]] && continue
  export RUSTFLAGS="$base_flags" CARGO_TARGET_DIR=$base_dir
  if [[ $built != *"<$pass>"* ]]; then
    b0=$SECONDS
    cargo test --release -p callcancel-loom-tests --no-run
    echo "::: loom build ($pass, RUSTFLAGS=$RUSTFLAGS): $((SECONDS - b0)) s"
    built+="<$pass>"
  fi
  start=$(date +%s.%N)
  if [[ $bound == - ]]; then
    unset LOOM_MAX_PREEMPTIONS
  else
    export LOOM_MAX_PREEMPTIONS=$bound
  fi
  if cargo test -q --release -p callcancel-loom-tests --test "$file" -- --exact "$test"; then
    status=ok
  else
    status=FAILED
    failed=1
  fi
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  report+=$(printf '%-6s %-40s %-10s %8s s  %s' "$pass" "$test" "${bound/-/none}" "$secs" "$status")$'\n'
done <<<"$models"
unset LOOM_MAX_PREEMPTIONS

echo
printf '%-6s %-40s %-10s %10s  %s\n' pass model preemption time result
printf '%s' "$report"
echo "::: loom models: $((SECONDS - t0)) s in total"
exit "$failed"
