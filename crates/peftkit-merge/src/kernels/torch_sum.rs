//! torch's CPU `sum` / `mean` of a contiguous `f32` vector, in torch's summation order.
//!
//! bitsandbytes' double quantization subtracts `absmax.mean()` from the block scales before it
//! quantizes them, and stores that mean; reproducing its bytes needs torch's order of additions.
//! torch 2.15's `cascade_sum` (aten/src/ATen/native/cpu/SumKernel.cpp) runs its AVX2 build on
//! every x86 CPU with AVX2, AVX-512 ones included (the sum kernel is not dispatched to AVX-512):
//!
//! * fewer than 8 elements: 4 interleaved scalar accumulators;
//! * otherwise 8-lane vectors, 4 interleaved vector accumulators, each a 4-level cascade (a
//!   level is flushed into the next every `2^max(4, ⌈log2 n⌉ / 4)` steps); the tail elements
//!   are summed from 0, then the 8 lanes are added to that in order;
//! * above 32768 elements torch splits the range between its threads (one chunk each, summed as
//!   above) and adds the chunk sums in thread order, so the result depends on the thread count.
//!
//! Checked against torch on the lengths in `tests/fixtures/bnb/kernels.safetensors`.

/// The vector width of torch's AVX2 sum kernel.
const LANES: usize = 8;
/// torch's `at::internal::GRAIN_SIZE`: ranges up to this length are summed by one thread.
const GRAIN: usize = 32768;

/// `x.mean()` for a contiguous `f32` tensor, as torch computes it with `threads` intra-op
/// threads: the sum in torch's order, divided by the length in `f32`.
///
/// ```
/// use peftkit_merge::torch_mean_f32;
/// assert_eq!(torch_mean_f32(&[1.0, 2.0, 4.0], 1), 7.0 / 3.0);
/// ```
pub fn torch_mean_f32(values: &[f32], threads: usize) -> f32 {
    torch_sum_f32(values, threads) / values.len() as f32
}

/// `x.sum()` for a contiguous `f32` tensor with `threads` intra-op threads (see the module
/// documentation for the order).
pub fn torch_sum_f32(values: &[f32], threads: usize) -> f32 {
    let n = values.len();
    if n <= GRAIN || threads <= 1 {
        return chunk_sum(values);
    }
    // at::parallel_for: min(threads, ⌈n / grain⌉) chunks of ⌈n / chunks⌉ elements.
    let chunks = threads.min(n.div_ceil(GRAIN));
    let len = n.div_ceil(chunks);
    values.chunks(len).fold(0.0f32, |acc, c| acc + chunk_sum(c))
}

/// One thread's `cascade_sum` over a contiguous range.
fn chunk_sum(x: &[f32]) -> f32 {
    if x.len() < LANES {
        return row_sum::<1>(x.len(), |i| [x[i]])[0];
    }
    let vectors = x.len() / LANES;
    let lane = |i: usize| -> [f32; LANES] {
        let mut v = [0.0f32; LANES];
        v.copy_from_slice(&x[i * LANES..(i + 1) * LANES]);
        v
    };
    let partial = row_sum::<LANES>(vectors, lane);
    let mut acc = 0.0f32;
    for &t in &x[vectors * LANES..] {
        acc += t;
    }
    for p in partial {
        acc += p;
    }
    acc
}

/// `row_sum`: `size` items (vectors of `W` lanes) summed by 4 interleaved cascades.
fn row_sum<const W: usize>(size: usize, item: impl Fn(usize) -> [f32; W]) -> [f32; W] {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut partial = multi_row_sum::<W>(rows, |r, k| item(r * ILP + k));
    for i in rows * ILP..size {
        add(&mut partial[0], &item(i));
    }
    let [mut p0, p1, p2, p3] = partial;
    for p in [p1, p2, p3] {
        add(&mut p0, &p);
    }
    p0
}

/// `multi_row_sum` with 4 rows: each of the 4 accumulators a 4-level cascade.
fn multi_row_sum<const W: usize>(
    size: usize,
    item: impl Fn(usize, usize) -> [f32; W],
) -> [[f32; W]; 4] {
    const LEVELS: usize = 4;
    let power = 4.max(ceil_log2(size) / LEVELS as u32);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0.0f32; W]; 4]; LEVELS];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &item(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let lower = std::mem::replace(&mut acc[j - 1], [[0.0; W]; 4]);
            for (a, l) in acc[j].iter_mut().zip(&lower) {
                add(a, l);
            }
            if i & (mask << (j as u32 * power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &item(i, k));
        }
        i += 1;
    }
    let [mut first, rest @ ..] = acc;
    for level in rest {
        for (a, b) in first.iter_mut().zip(&level) {
            add(a, b);
        }
    }
    first
}

fn add<const W: usize>(acc: &mut [f32; W], x: &[f32; W]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// `c10::utils::CeilLog2`: ⌈log2 n⌉, 0 for n ≤ 1.
fn ceil_log2(n: usize) -> u32 {
    if n <= 1 {
        0
    } else {
        usize::BITS - (n - 1).leading_zeros()
    }
}
