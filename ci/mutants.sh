#!/usr/bin/env bash
# Shows that the loom models bite: each deliberate bug (a `callcancel_mutant`
# cfg hook in src/) is built under loom and the model that should catch it
# is run; the model must FAIL. The script fails if any mutant survives (or
# if a model fails on the unmutated code). Not part of .ci/run: each mutant
# is a full loom rebuild (a minute or two on 2 cores).
#
# Hooks (file: function):
#   no_inline_run          src/state.rs:   CallState::publish_registration forgets a
#                                          cancel that came first (no inline run, R4)
#   complete_ignores_claim src/state.rs:   CallState::complete frees while the
#                                          claimed callback still runs (R3)
#   relaxed_publish        src/slot.rs:    CallSlot::store_registration publishes the
#                                          callback with Relaxed, not Release
#   no_recheck             src/channel.rs: ChannelShared::begin_call skips the SeqCst
#                                          re-check of the host/channel flags (R4)
#   no_waker_recheck       src/waiter.rs:  WaitState::poll returns Pending right after
#                                          registering the waker (lost wake-up)
#   no_started_wait        src/engine/channel.rs: ChannelShared::await_started returns at once:
#                                          a sweeper returns before a callback a
#                                          deadline job claimed (without STARTED)
#                                          started (A1); sweeps and cancel() take
#                                          STARTED in their claim, so no sweeper
#                                          waits on them
#   watch_primary          src/wait/cancel.rs: a CancelWatch future may take the
#                                          slot's waker (lost wake-up after reuse)
#   canceller_current_gen  src/call.rs:    Canceller::cancel cancels whatever call
#                                          occupies the slot now (R6 across reuse)
#   no_cover               src/store/slab.rs: Slab::cover never raises the segments
#                                          bound: a sweep that scans below it misses
#                                          a call in a newly grown segment (R4)
#   registered_early       src/engine/channel.rs: ChannelShared::enter_table announces
#                                          the channel as in the table before
#                                          publishing it: another first call skips
#                                          ahead and an abort misses its call (R4)
#   no_settle_fence        src/engine/channel.rs: ChannelShared::settle re-reads the
#                                          swept calls without its fence(SeqCst):
#                                          sweeper and owner both miss the other's
#                                          write, nobody frees (pair 2b, a leak)
#   owner_ignores_returned src/slot.rs:    CallSlot::callback_returned always says
#                                          no: an owner completing after the
#                                          sweeper's re-check leaves the free to
#                                          nobody (pair 2b, a leak)
#   owner_no_walk          src/engine/channel.rs: OwnerPin takes no slab walk: a handed-over
#                                          slot in segment 1 may be freed under the
#                                          owner (miri: use after free)
#   no_immediate_free      src/engine/channel.rs: a sweep batches even a completion it
#                                          sees right after the callback: a later
#                                          callback waits for that free (native test)
#   retire_ignores_walkers src/store/table.rs: ChannelTable::release drops a
#                                          retired table reference while a walker
#                                          may still upgrade it (use after free;
#                                          loom's shadow check)
#   retire_no_second_look  src/store/table.rs: ChannelTable::release parks a
#                                          reference without looking at the
#                                          walkers again: it may stay parked
#                                          after the last walker left (a leak)
#   no_duty                src/state.rs:   CallState::request_duty never hands the
#                                          release duties over (orphan leak,
#                                          idle waiter never woken)
set -euo pipefail
IFS=$'\n\t'
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/mutants}
base="--cfg loom -C debug-assertions"

# mutant file test [preemption bound, default $LOOM_MAX_PREEMPTIONS]
mutants="
no_inline_run register_vs_abort register_vs_host_abort
complete_ignores_claim cancel_vs_complete cancel_vs_complete_while_callback_runs
relaxed_publish register_vs_abort register_vs_host_abort
no_recheck begin_call_vs_abort begin_call_vs_host_abort
no_waker_recheck cancelled_future cancelled_future_vs_abort
no_started_wait deadline fault_waits_for_a_claimed_deadline_job
watch_primary watch_reuse watch_repolled_across_slot_reuse
no_duty orphan last_handle_vs_finishing_free
canceller_current_gen cancel_per_call canceller_vs_complete_and_reuse
no_cover shrink begin_call_in_a_new_segment_vs_fault
registered_early begin_call_vs_abort two_first_calls_vs_host_abort 2
no_settle_fence batched_finish fault_settles_vs_complete
owner_ignores_returned batched_finish fault_settles_vs_complete
retire_ignores_walkers reclaim table_walk_vs_last_drop
retire_no_second_look reclaim two_table_walks_vs_last_drop
"

run() { # flags file test -> exit status of the model, output in $out
  local out
  out=$(RUSTFLAGS="$1" cargo test -q --release -p callcancel-loom-tests --test "$2" -- --exact "$3" 2>&1)
  local rc=$?
  why=$(grep -m1 -E 'panicked|Causality|deadlock' -A1 <<<"$out" | tail -1 | cut -c1-70)
  if grep -q -i deadlock <<<"$out"; then why="deadlock (lost wake-up)"; fi
  return $rc
}

# Optional: only mutants whose name matches $1 (a regex).
filter=${1:-}
# Three-thread models need a preemption bound (as in ci/loom.sh).
default_bound=${LOOM_MAX_PREEMPTIONS:-3}

report=""
survived=0
IFS=$' \n\t'
while read -r name file test bound; do
  [[ -z $name ]] && continue
  export LOOM_MAX_PREEMPTIONS=${bound:-$default_bound}
  [[ -n $filter && ! $name =~ $filter ]] && continue
  echo "::: mutant $name -> $file::$test"
  if ! run "$base" "$file" "$test"; then
    echo "baseline model $test fails on unmutated code: $why" >&2
    exit 2
  fi
  if run "$base --cfg callcancel_mutant=\"$name\"" "$file" "$test"; then
    status=SURVIVED
    survived=1
    why="-"
  else
    status=caught
  fi
  report+=$(printf '%-24s %-42s %-9s %s' "$name" "$test" "$status" "$why")$'\n'
done <<<"$mutants"

# Mutants that loom cannot see (a free of std-allocated memory, a free
# that is only late): a test that must fail, run by miri or natively.
# mutant tool target test
test_mutants="
owner_no_walk miri --lib engine::channel::tests::the_owner_keeps_a_handed_over_slot_of_segment_1_alive
no_immediate_free native --test=a3_reentrant a_call_completed_inside_its_callback_is_freed_before_the_next_callback
"

run_test() { # flags tool target test -> exit status of the test
  local out rc
  if [[ $2 == miri ]]; then
    out=$(RUSTFLAGS="$1" CARGO_TARGET_DIR="$CARGO_TARGET_DIR/miri" \
      MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-permissive-provenance -Zmiri-ignore-leaks" \
      cargo +nightly miri test -q -p callcancel "$3" -- --exact "$4" 2>&1)
  else
    out=$(RUSTFLAGS="$1" CARGO_TARGET_DIR="$CARGO_TARGET_DIR/native" \
      cargo test -q -p callcancel "$3" -- --exact "$4" 2>&1)
  fi
  rc=$?
  why=$(grep -m1 -E 'Undefined Behavior|panicked' -A1 <<<"$out" | tail -1 | cut -c1-70)
  return $rc
}

while read -r name tool target test; do
  [[ -z $name ]] && continue
  [[ -n $filter && ! $name =~ $filter ]] && continue
  if [[ $tool == miri ]] && ! cargo +nightly miri --version >/dev/null 2>&1; then
    report+=$(printf '%-24s %-42s %-9s %s' "$name" "${test:0:42}" SKIPPED "no nightly miri")$'\n'
    continue
  fi
  echo "::: mutant $name -> $tool $target $test"
  if ! run_test "" "$tool" "$target" "$test"; then
    echo "baseline test $test fails on unmutated code: $why" >&2
    exit 2
  fi
  if run_test "--cfg callcancel_mutant=\"$name\"" "$tool" "$target" "$test"; then
    status=SURVIVED
    survived=1
    why="-"
  else
    status=caught
  fi
  report+=$(printf '%-24s %-42s %-9s %s' "$name" "${test:0:42}" "$status" "$why")$'\n'
done <<<"$test_mutants"

echo
printf '%-24s %-42s %-9s %s\n' mutant model result "how"
printf '%s' "$report"
exit "$survived"
