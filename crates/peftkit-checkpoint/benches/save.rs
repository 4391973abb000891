//! Benchmark: save a ~1 GB in-memory state dict with `save_pretrained` and compare with
//! writing the same bytes with `std::fs::write` + fsync (the floor for any writer).
//!
//! Run: `cargo bench -p peftkit-checkpoint --bench save [-- SIZE_MB]`. Prints wall times and
//! the peak resident memory above what the caller holds (VmHWM minus VmRSS before the save,
//! Linux only). Results go in docs/benchmarks.md; nothing here asserts a time.

use std::sync::Arc;
use std::time::Instant;

use peftkit_checkpoint::{save_pretrained, Dtype, SaveOptions, StateDict, Tensor};

fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn reset_peak() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let mb: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1024);
    let tmp =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    // Llama-like tensor sizes: 32 MB blocks of bf16, the caller holds them all.
    let block = 32 << 20;
    let n = (mb << 20) / block;
    let mut state = StateDict::new();
    let mut raw = Vec::new();
    for i in 0..n {
        let bytes: Vec<u8> = (0..block).map(|j| (i * 31 + j) as u8).collect();
        let buf = Arc::new(bytes);
        raw.push(buf.clone());
        let t = Tensor::from_shared(Dtype::BF16, vec![block / 2], buf, 0..block).unwrap();
        state.insert(format!("model.layers.{i}.mlp.weight"), t);
    }
    let total: usize = raw.iter().map(|b| b.len()).sum();
    println!(
        "state dict: {n} tensors, {:.1} MB held by the caller",
        total as f64 / 1e6
    );

    // Each round: the same bytes written by the simplest possible writer (fsynced), then
    // save_pretrained as one file and as 300 MB shards. Rounds alternate so page-cache and
    // disk warm-up hit all three alike; the median is reported.
    let mut copy_s = Vec::new();
    let mut single_s = Vec::new();
    let mut shard_s = Vec::new();
    let mut peak_mb: f64 = 0.0;
    for _round in 0..5 {
        let base = tmp.path().join("copy.bin");
        let t0 = Instant::now();
        {
            use std::io::Write;
            let mut f =
                std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&base).unwrap());
            for b in &raw {
                f.write_all(b).unwrap();
            }
            f.into_inner().unwrap().sync_all().unwrap();
        }
        copy_s.push(t0.elapsed().as_secs_f64());
        std::fs::remove_file(&base).unwrap();
        for (times, opts) in [
            (&mut single_s, SaveOptions::default()),
            (
                &mut shard_s,
                SaveOptions {
                    max_shard_size: 300_000_000,
                    ..Default::default()
                },
            ),
        ] {
            let out = tmp.path().join("ckpt");
            reset_peak();
            let before = status_kb("VmRSS:").unwrap_or(0);
            let t0 = Instant::now();
            save_pretrained(&out, &state, &opts).unwrap();
            times.push(t0.elapsed().as_secs_f64());
            let peak = status_kb("VmHWM:").unwrap_or(0);
            peak_mb = peak_mb.max(peak.saturating_sub(before) as f64 / 1024.0);
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let copy = median(&mut copy_s);
    let single = median(&mut single_s);
    let shards = median(&mut shard_s);
    println!("plain write + fsync:          {copy:.2} s");
    println!(
        "save_pretrained, one file:    {single:.2} s ({:.2}x)",
        single / copy
    );
    println!(
        "save_pretrained, 300MB shards: {shards:.2} s ({:.2}x)",
        shards / copy
    );
    println!("peak RSS above the caller:    {peak_mb:.1} MB");
}
