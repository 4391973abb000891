//! Benchmark of the LoRA merge arithmetic alone (no file IO): `merge_linear` on Llama-sized
//! projections, for each base dtype, through the fused path (plain merge), the general
//! row-block path (`round_delta_first`, which must decode, materialise Δ and encode) and exact
//! numerics (`Numerics::Exact`, see `merge::exact`).
//!
//! Run: `cargo bench -p peftkit-merge --bench merge_kernels [-- RANK] [-- OUTxIN] [-- PATH]`
//! (one shape, e.g. `4096x4096`, instead of the default three; one path, `fused`, `general`
//! or `exact`, instead of all three). Prints the median of 7
//! runs per case in ms and in GB/s of base bytes, and the fastest run; nothing here asserts a time. Results go in
//! docs/benchmarks.md.

use std::time::Instant;

use peftkit_merge::encode_f32;
use peftkit_merge::{merge_linear, MergeOptions};
use peftkit_merge::{BaseTensorMut, F32Tensor, Numerics};
use safetensors::Dtype;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn main() {
    let r: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(16);
    let shapes: Vec<(usize, usize)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (o, i) = a.split_once('x')?;
            Some((o.parse().ok()?, i.parse().ok()?))
        })
        .collect();
    let shapes = if shapes.is_empty() {
        vec![(2048usize, 2048usize), (5632, 2048), (2048, 5632)]
    } else {
        shapes
    };
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| ["fused", "general", "exact"].contains(&a.as_str()))
        .collect();
    println!("rank {r}, {} rayon threads", rayon::current_num_threads());
    for (out, inp) in shapes {
        let a = values(r * inp, 1);
        let b = values(out * r, 2);
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            // Weights of a trained model's scale (|w| ≲ 0.05), rounded to the base dtype.
            let base = encode_f32("base", dtype, &values(out * inp, 3)).expect("encode");
            for (path, opts) in [
                ("fused", MergeOptions::default()),
                (
                    "general",
                    MergeOptions {
                        round_delta_first: true,
                        ..MergeOptions::default()
                    },
                ),
                (
                    "exact",
                    MergeOptions {
                        numerics: Numerics::Exact,
                        ..MergeOptions::default()
                    },
                ),
            ] {
                if !only.is_empty() && !only.iter().any(|o| o == path) {
                    continue;
                }
                let mut times = Vec::new();
                for _ in 0..7 {
                    let mut data = base.clone();
                    let shape = [out, inp];
                    let t0 = Instant::now();
                    merge_linear(
                        BaseTensorMut::new(dtype, &shape, &mut data),
                        F32Tensor::new(&[r, inp], &a),
                        F32Tensor::new(&[out, r], &b),
                        2.0,
                        false,
                        &opts,
                    )
                    .expect("merge");
                    times.push(t0.elapsed().as_secs_f64());
                    std::hint::black_box(&data);
                }
                times.sort_by(f64::total_cmp);
                let med = times[times.len() / 2];
                println!(
                    "{out:>5}x{inp:<5} {dtype:?} {path:<8} {:8.2} ms {:6.2} GB/s (fastest {:.2} ms)",
                    med * 1e3,
                    base.len() as f64 / med / 1e9,
                    times[0] * 1e3
                );
            }
        }
    }
}
