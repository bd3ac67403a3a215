#!/usr/bin/env bash
# The grpc_demo example end to end, as an external client drives it: start it
# on an ephemeral port, read its first line, make a few RPCs with the
# demo_client example, SIGTERM it, check exit status 0 and the counters line.
# Run from the workspace root (CI: .ci/run).
set -euo pipefail
cargo build --release -p callcancel-tower --example grpc_demo --example demo_client
bin=${CARGO_TARGET_DIR:-target}/release/examples
out=$(mktemp)
trap 'rm -f "$out"; [[ -n ${pid:-} ]] && kill -9 "$pid" 2>/dev/null || true' EXIT
"$bin/grpc_demo" --port 0 --close-timeout-ms 500 >"$out" &
pid=$!
for _ in $(seq 100); do [[ -s $out ]] && break; sleep 0.1; done
first=$(head -n 1 "$out")
if [[ ! $first =~ ^listening\ on\ 127\.0\.0\.1:([0-9]+)$ ]]; then
  echo "bad first line: '$first'" >&2
  exit 1
fi
addr=127.0.0.1:${BASH_REMATCH[1]}
"$bin/demo_client" "$addr" work 20
"$bin/demo_client" "$addr" block 20
"$bin/demo_client" "$addr" relay 5
# A deadline: answered DEADLINE_EXCEEDED (or CANCELLED by the client's own timer).
"$bin/demo_client" "$addr" work 5000 50 && { echo "deadline call succeeded" >&2; exit 1; }
"$bin/demo_client" "$addr" stats
kill -TERM "$pid"
rc=0
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
wait "$pid" || rc=$?
pid=
last=$(tail -n 1 "$out")
echo "$last"
[[ $rc == 0 ]] || { echo "grpc_demo exited $rc" >&2; exit 1; }
re='^in_flight=0 started=4 completed=3 cancelled_host_abort=0 cancelled_channel_faulted=[01] cancelled_call=[01] cancelled_deadline=[01] freed=4 refused=0$'
[[ $last =~ $re ]] || { echo "unexpected counters line" >&2; exit 1; }
echo "grpc_demo end to end: ok"
