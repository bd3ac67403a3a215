#!/usr/bin/env bash
# Issue 16: the cross-process soak of the grpc_demo (A -> B -> C, random load,
# cancels, deadlines, dropped connections, restarts of B), default length
# (SOAK_SECS, default 60). Run from the workspace root (CI: .ci/run).
#
# Equivalent to
#   cargo build --release -p callcancel-tower --example grpc_demo && cargo run --release -p callcancel-soak
# but with both packages in ONE cargo build: their features then unify as in
# demo_e2e.sh's build, so the release tonic/hyper stack already built there
# is reused (a separate `cargo run -p callcancel-soak` would rebuild tonic,
# hyper-util and axum with the soak's own, smaller feature set: ~1 min more
# on the 2-core machine). The soak binary is then run directly.
set -euo pipefail
cargo build --release -p callcancel-tower --example grpc_demo -p callcancel-soak --bin callcancel-soak
target=${CARGO_TARGET_DIR:-target}
exec "$target/release/callcancel-soak" "$target/release/examples/grpc_demo"
