//! Placeholder: filled in by the benchmarks work (issue 5).
fn main() {}
