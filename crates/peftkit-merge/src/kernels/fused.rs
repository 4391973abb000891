//! The plain merge `W ← fl(f32(W) + Δ)` with `Δ` never written to memory.
//!
//! The general path ([`super::apply`]) decodes a block of base rows to `f32`, writes the delta
//! rows to a scratch buffer, adds, and encodes: four passes over memory per element. For the
//! common case (Linear/`Conv1D` LoRA, unsafe merge, f32 adapter) this module instead lets the
//! GEMM kernel add each finished register tile of `Δ` to the base bytes in place: with the
//! hand-written AVX-512 kernel ([`super::avx512`]) or, without AVX-512, the AVX2 one
//! ([`super::avx2`]) for F32/BF16/F16 bases, else with the generic kernel and an adding [`Sink`] for F32/BF16 (for F16 the generic version was slower
//! than the general path, which it then keeps). The operations on every element are those of
//! the general path (`Δ = fl32(P · s)`, one add in f32, one rounding), so the bits are the
//! same; a test checks it.

use std::marker::PhantomData;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use super::dtype::{bf16_bits_to_f32, decode_le, encode_le, f32_to_bf16_bits};
use super::gemm::{product_into, Product, Sink};

/// Adds `Δ` (reduced over the rank in `blocks`, MKL's order) to `data` (the base tensor's
/// little-endian bytes) in place. With `check`, each block is tested for NaN and infinity right
/// after it is written, while it is in cache. Returns `Some(false)` when a tested block holds
/// one, `Some(true)` otherwise, or `None`, having done nothing, when the base dtype has no fused
/// path on this CPU (the caller then takes the general one).
///
/// The caller has checked the shapes: `data` holds `batch·rows × n` elements.
pub(crate) fn add_in_place(
    p: &Product<'_>,
    blocks: &[Range<usize>],
    dtype: Dtype,
    data: &mut [u8],
    check: bool,
) -> Option<bool> {
    let test = check.then_some(dtype);
    #[cfg(target_arch = "x86_64")]
    if let Some(ty) = super::avx512::BaseType::of(dtype) {
        if super::avx512::available() {
            return Some(for_each_segment(
                p,
                dtype,
                test,
                data,
                |left, right, rows, bytes| {
                    super::avx512::add_rows(
                        ty,
                        left,
                        right,
                        (rows, p.k, p.n),
                        blocks,
                        p.scale,
                        bytes,
                    )
                },
            ));
        }
        if super::avx2::available() {
            return Some(for_each_segment(
                p,
                dtype,
                test,
                data,
                |left, right, rows, bytes| {
                    super::avx2::add_rows(ty, left, right, (rows, p.k, p.n), blocks, p.scale, bytes)
                },
            ));
        }
    }
    add_generic(p, blocks, dtype, data, test)
}

/// The fused path without the hand-written kernels: F32 and BF16 only.
fn add_generic(
    p: &Product<'_>,
    blocks: &[Range<usize>],
    dtype: Dtype,
    data: &mut [u8],
    test: Option<Dtype>,
) -> Option<bool> {
    match dtype {
        Dtype::BF16 => Some(add_with_sink::<Bf16>(p, blocks, data, test)),
        Dtype::F32 => Some(add_with_sink::<F32>(p, blocks, data, test)),
        _ => None,
    }
}

fn add_with_sink<E: Elem>(
    p: &Product<'_>,
    blocks: &[Range<usize>],
    data: &mut [u8],
    test: Option<Dtype>,
) -> bool {
    for_each_segment(p, E::DTYPE, test, data, |left, right, rows, bytes| {
        let mut sink = AddInto::<E> {
            bytes,
            n: p.n,
            elem: PhantomData,
        };
        product_into(left, right, p.k, p.n, blocks, p.scale, &mut sink, rows);
    })
}

/// Base bytes per rayon task: about 1 MiB, so that each column panel of the right factor is
/// reused by many rows and big tensors still make several tasks.
const BLOCK_BYTES: usize = 1 << 20;

/// Splits `data` into blocks of whole rows run in parallel, and each block at batch-entry
/// boundaries (experts); calls `f(left rows, right factor, row count, base bytes)` per piece.
/// With `test`, checks each block for NaN and infinity as soon as it is done; returns `false`
/// when one holds some.
fn for_each_segment<F>(
    p: &Product<'_>,
    dtype: Dtype,
    test: Option<Dtype>,
    data: &mut [u8],
    f: F,
) -> bool
where
    F: Fn(&[f32], &[f32], usize, &mut [u8]) + Sync,
{
    let elem_size = dtype.bitsize() / 8;
    let row_bytes = p.n * elem_size;
    if row_bytes == 0 {
        return true;
    }
    // Multiples of 8 rows keep the kernels' row tiles whole.
    let rows_per_block = (BLOCK_BYTES / row_bytes).max(1).div_ceil(8) * 8;
    let (k, n) = (p.k, p.n);
    data.par_chunks_mut(rows_per_block * row_bytes)
        .enumerate()
        .map(|(bi, bytes)| {
            let first = bi * rows_per_block;
            let end = first + bytes.len() / row_bytes;
            let mut g = first;
            while g < end {
                let e = g / p.rows.max(1);
                let seg_end = end.min((e + 1) * p.rows);
                f(
                    &p.left[g * k..seg_end * k],
                    &p.right[e * k * n..(e + 1) * k * n],
                    seg_end - g,
                    &mut bytes[(g - first) * row_bytes..(seg_end - first) * row_bytes],
                );
                g = seg_end;
            }
            test.is_none_or(|d| peftkit_checkpoint::nonfinite(d, bytes).is_none())
        })
        .reduce(|| true, |a, b| a && b)
}

/// A base element type the generic sink adds into.
trait Elem {
    const SIZE: usize;
    const DTYPE: Dtype;
    /// Decodes `out.len()` little-endian elements from `bytes`.
    fn decode(bytes: &[u8], out: &mut [f32]);
    /// Encodes `vals` into `bytes`, rounding as torch does.
    fn encode(vals: &[f32], bytes: &mut [u8]);
}

struct F32;
struct Bf16;

impl Elem for F32 {
    const SIZE: usize = 4;
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        decode_le(bytes, out, f32::from_le_bytes);
    }
    #[inline(always)]
    fn encode(vals: &[f32], bytes: &mut [u8]) {
        encode_le(vals, bytes, f32::to_le_bytes);
    }
}

impl Elem for Bf16 {
    const SIZE: usize = 2;
    const DTYPE: Dtype = Dtype::BF16;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        decode_le(bytes, out, |b| bf16_bits_to_f32(u16::from_le_bytes(b)));
    }
    #[inline(always)]
    fn encode(vals: &[f32], bytes: &mut [u8]) {
        encode_le(vals, bytes, |v| f32_to_bf16_bits(v).to_le_bytes());
    }
}

/// Adds finished product elements into row-major base bytes of element type `E`.
struct AddInto<'a, E> {
    bytes: &'a mut [u8],
    n: usize,
    elem: PhantomData<E>,
}

impl<E: Elem> Sink for AddInto<'_, E> {
    #[inline(always)]
    fn put<const W: usize>(&mut self, row: usize, col: usize, vals: &[f32; W]) {
        let at = (row * self.n + col) * E::SIZE;
        let dst = &mut self.bytes[at..at + W * E::SIZE];
        let mut w = [0f32; W];
        E::decode(dst, &mut w);
        for (x, d) in w.iter_mut().zip(vals) {
            *x += *d;
        }
        E::encode(&w, dst);
    }

    #[inline(always)]
    fn put_one(&mut self, row: usize, col: usize, val: f32) {
        let at = (row * self.n + col) * E::SIZE;
        let dst = &mut self.bytes[at..at + E::SIZE];
        let mut w = [0f32; 1];
        E::decode(dst, &mut w);
        w[0] += val;
        E::encode(&w, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::super::dtype::{decode_f32, encode_f32};
    use super::super::gemm::product_rows;
    use super::super::order::active_k_blocks;
    use super::*;

    /// Base values with the cases rounding must get right: signed zeros, subnormals, values
    /// that overflow BF16/F16 after the add, infinities and NaNs with payloads.
    fn base_values(len: usize) -> Vec<f32> {
        let specials = [
            0.0,
            -0.0,
            1e-40,
            -3e-39,
            6e-8,
            3.3e38,
            -3.38e38,
            65500.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7FC0_1234),
            f32::from_bits(0xFF80_0001),
        ];
        let mut s = 7u64;
        (0..len)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if i % 17 == 3 {
                    specials[(s >> 33) as usize % specials.len()]
                } else {
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                }
            })
            .collect()
    }

    fn factor(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // A wide range, so that some deltas overflow 16-bit types.
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                    * if s.is_multiple_of(97) { 1e6 } else { 0.3 }
            })
            .collect()
    }

    /// The general path's arithmetic: decode, `Δ` into a buffer, add, encode.
    fn reference(
        p: &Product<'_>,
        blocks: &[Range<usize>],
        batch: usize,
        dtype: Dtype,
        base: &[u8],
    ) -> Vec<u8> {
        let mut w = decode_f32("base", dtype, base).unwrap();
        let mut delta = vec![0f32; batch * p.rows * p.n];
        for e in 0..batch {
            product_rows(
                &p.left[e * p.rows * p.k..(e + 1) * p.rows * p.k],
                &p.right[e * p.k * p.n..(e + 1) * p.k * p.n],
                p.k,
                p.n,
                blocks,
                p.scale,
                &mut delta[e * p.rows * p.n..(e + 1) * p.rows * p.n],
            );
        }
        for (x, d) in w.iter_mut().zip(&delta) {
            *x += *d;
        }
        encode_f32("base", dtype, &w).unwrap()
    }

    #[test]
    fn fused_paths_equal_the_general_arithmetic() {
        // Rows not a multiple of the row tile, columns with a tail, one and three rank blocks,
        // two experts whose boundary falls inside a rayon block, and a tensor big enough to be
        // split into several rayon blocks.
        for &(batch, rows, k, n) in &[
            (1, 13, 20, 45),
            (2, 11, 7, 64),
            (1, 9, 400, 33),
            (3, 5, 16, 100),
            (1, 600, 16, 1000),
        ] {
            let left = factor(batch * rows * k, 1);
            let right = factor(batch * k * n, 2);
            let blocks = active_k_blocks(k);
            let p = Product {
                left: &left,
                right: &right,
                rows,
                k,
                n,
                scale: 0.75,
            };
            for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
                let base = encode_f32("base", dtype, &base_values(batch * rows * n)).unwrap();
                let want = reference(&p, &blocks, batch, dtype, &base);
                let mut paths: Vec<(&str, Vec<u8>)> = Vec::new();
                let mut got = base.clone();
                if add_generic(&p, &blocks, dtype, &mut got, None).is_some() {
                    paths.push(("generic", got));
                }
                // One kernel call over all rows (no rayon split) is only valid for one entry.
                #[cfg(target_arch = "x86_64")]
                if let Some(ty) = super::super::avx512::BaseType::of(dtype)
                    .filter(|_| batch == 1 && super::super::avx512::available())
                {
                    let mut got = base.clone();
                    super::super::avx512::add_rows(
                        ty,
                        &left,
                        &right,
                        (batch * rows, k, n),
                        &blocks,
                        0.75,
                        &mut got,
                    );
                    paths.push(("avx512 (one call)", got));
                }
                #[cfg(target_arch = "x86_64")]
                if let Some(ty) = super::super::avx512::BaseType::of(dtype)
                    .filter(|_| batch == 1 && super::super::avx2::available())
                {
                    let mut got = base.clone();
                    super::super::avx2::add_rows(
                        ty,
                        &left,
                        &right,
                        (batch * rows, k, n),
                        &blocks,
                        0.75,
                        &mut got,
                    );
                    paths.push(("avx2 (one call)", got));
                }
                let mut got = base.clone();
                let fused = add_in_place(&p, &blocks, dtype, &mut got, true);
                assert!(fused.is_some() || dtype == Dtype::F16);
                if let Some(finite) = fused {
                    let scan = peftkit_checkpoint::nonfinite(dtype, &got).is_none();
                    assert_eq!(finite, scan, "{dtype:?}: what the blocks found");
                }
                if got != base {
                    paths.push(("dispatched", got));
                }
                for (name, got) in paths {
                    let differ = got
                        .chunks(if dtype == Dtype::F32 { 4 } else { 2 })
                        .zip(want.chunks(if dtype == Dtype::F32 { 4 } else { 2 }))
                        .filter(|(a, b)| a != b)
                        .count();
                    assert_eq!(differ, 0, "{name} {dtype:?} {batch}x{rows}x{k}x{n}");
                }
            }
        }
    }
}
