//! Every input kept in `fuzz/regressions/<target>/` (crashes the fuzzers found, once fixed, and
//! a few seeds per target) replayed through the fuzz harnesses on the stable toolchain, so a
//! parser that regresses fails `cargo test` (docs/reliability.md, "Fuzzing").

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{}: no inputs", dir.display());
    for input in inputs {
        let data = std::fs::read(&input).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panicked", input.display());
    }
}

#[test]
fn safetensors_reader() {
    replay("safetensors_reader", harness::safetensors_reader);
}

#[test]
fn index_reader() {
    replay("index_reader", harness::index_reader);
}

#[test]
fn configs() {
    replay("configs", harness::configs);
}

#[test]
fn conversion_table() {
    replay("conversion_table", harness::conversion_table);
}

#[test]
fn py_regex() {
    replay("py_regex", harness::py_regex);
}
