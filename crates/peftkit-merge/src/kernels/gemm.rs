//! The low-rank product `L @ R` in the reduction order of torch's CPU matmul.
//!
//! peft computes `B @ A` with torch, which on x86 CPU calls MKL `sgemm`. To reproduce its f32
//! result bit for bit, every output element must be reduced over the rank in the same order
//! with the same roundings. Measured on torch 2.15 / MKL 2024.2 (1 and 2 threads):
//!
//! * the rank `k` is split into blocks, by a rule that depends on the host
//!   ([`super::order`]: blocks of 192 on AMD, of 384 on Intel with AVX-512);
//! * inside a block, the element is accumulated from `0` with one fused multiply-add per rank
//!   index, in increasing order: `acc = fma(L[m,k], R[k,n], acc)`;
//! * block results are added left to right with plain f32 additions: `((b0 + b1) + b2) + …`.
//!
//! Limits (measured): on AMD, MKL switches to other kernels when the product has fewer than 12
//! columns or fewer than 4 rows (for a LoRA delta: `in_features < 12` or `out_features < 4`);
//! there the order differs (for 2, 3, 4 or 8 columns it is sequential *unfused* multiply-add)
//! and results may differ in the last bit. [`super::order`] keeps each order's verified domain. Other BLAS libraries (OpenBLAS, Accelerate, cuBLAS) and TF32
//! have their own orders; bit-exactness is a property of this particular torch build.
//!
//! Speed: the inner loop runs over output columns, so each rank step is a vectorised FMA over a
//! contiguous row of `R`, with a tile of rows × columns of accumulators in registers. On x86-64
//! the kernel is compiled again with AVX2+FMA and picked at run time (the plain merge has its
//! own AVX-512 kernel, [`super::avx512`]); without hardware FMA, `f32::mul_add` falls back to libm's `fmaf`, which is exact but slow. Finished
//! elements go to a [`Sink`]: an `f32` matrix, or (for a plain merge) straight into the base
//! tensor's bytes, so that the delta is never written to memory.

use std::ops::Range;

use super::error::{check_len, MergeMathError, Result};
use super::order::active_k_blocks;

/// One low-rank product `Δ = scale · L_e @ R_e` per batch entry `e` (expert), as the fused and
/// the exact merges add it: row `g` of the base (viewed as `batch·rows × n`) gets row
/// `g % rows` of `Δ_{g / rows}`, that is `scale · Σ_k left[g, k] · right_e[k, :]`.
pub(crate) struct Product<'a> {
    /// `batch·rows × k`.
    pub left: &'a [f32],
    /// `batch × k × n`.
    pub right: &'a [f32],
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    /// Negative for an unmerge (negation is exact).
    pub scale: f32,
}

/// `scale · (left @ right)` in torch/MKL's f32 order (the active [`super::ReductionOrder`]), as
/// a new row-major `m × n` matrix.
///
/// `left` is `m × k` and `right` is `k × n`, both row-major. `scale` is applied to each finished
/// element with one f32 multiplication (torch's `(B @ A) * s`); pass `1.0` for the bare product.
pub fn lowrank_product(
    left: &[f32],
    right: &[f32],
    m: usize,
    k: usize,
    n: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    check_len("left factor", &[m, k], left.len())?;
    check_len("right factor", &[k, n], right.len())?;
    let total = m.checked_mul(n).ok_or(MergeMathError::Overflow {
        what: "product",
        shape: vec![m, n],
    })?;
    let mut out = vec![0f32; total];
    if n == 0 {
        return Ok(out);
    }
    let blocks = active_k_blocks(k);
    product_rows(left, right, k, n, &blocks, scale, &mut out);
    Ok(out)
}

/// Computes `out[q, :] = scale · Σ_blocks (Σ_{k∈block} fma-seq left[q, k] · right[k, :])` for
/// every row `q` of `left` (`rows × k`). `out` is `rows × n`.
///
/// Callers guarantee `left.len() == rows·k`, `right.len() == k·n`, `out.len() == rows·n`.
pub(crate) fn product_rows(
    left: &[f32],
    right: &[f32],
    k: usize,
    n: usize,
    blocks: &[Range<usize>],
    scale: f32,
    out: &mut [f32],
) {
    let rows = out.len().checked_div(n).unwrap_or(0);
    product_into(
        left,
        right,
        k,
        n,
        blocks,
        scale,
        &mut StoreF32 { out, n },
        rows,
    );
}

/// Where the kernel puts finished elements of the product (already scaled): stored as `f32`
/// ([`StoreF32`]) or added straight into the bytes of a base tensor ([`super::fused`]), so that
/// a plain merge never materialises the delta.
///
/// `row` counts from the first row of the call, `col` from 0.
pub(crate) trait Sink {
    /// Takes `vals`, the elements `col..col + W` of product row `row`.
    fn put<const W: usize>(&mut self, row: usize, col: usize, vals: &[f32; W]);
    /// Takes element `col` of product row `row`.
    fn put_one(&mut self, row: usize, col: usize, val: f32);
}

/// Stores the product into a row-major `rows × n` `f32` matrix.
pub(crate) struct StoreF32<'a> {
    out: &'a mut [f32],
    n: usize,
}

impl Sink for StoreF32<'_> {
    #[inline(always)]
    fn put<const W: usize>(&mut self, row: usize, col: usize, vals: &[f32; W]) {
        let at = row * self.n + col;
        self.out[at..at + W].copy_from_slice(vals);
    }

    #[inline(always)]
    fn put_one(&mut self, row: usize, col: usize, val: f32) {
        self.out[row * self.n + col] = val;
    }
}

/// Runs the product of `rows` rows of `left` with `right` into `sink`, with AVX2+FMA when the
/// CPU has them. Both builds perform the same operations on every element, so they give the
/// same bits. (The plain merge has a hand-written AVX-512 kernel, [`super::avx512`]; the
/// compiler's AVX-512 build of this generic tile was slower than its AVX2 build.)
#[allow(clippy::too_many_arguments)]
pub(crate) fn product_into<S: Sink>(
    left: &[f32],
    right: &[f32],
    k: usize,
    n: usize,
    blocks: &[Range<usize>],
    scale: f32,
    sink: &mut S,
    rows: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::isa::isa() >= super::isa::Isa::Avx2 {
            // SAFETY: `Isa::Avx2` means the two features enabled on `product_avx2` were detected.
            unsafe { product_avx2(left, right, k, n, blocks, scale, sink, rows) };
            return;
        }
    }
    product_tiled::<S, 6, 16>(left, right, k, n, blocks, scale, sink, rows);
}

/// [`product_tiled`] compiled with AVX2 and FMA, so `mul_add` becomes `vfmadd` and the column
/// loops vectorise: 6 rows × 16 columns of accumulators (12 of the 16 `ymm` registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn product_avx2<S: Sink>(
    left: &[f32],
    right: &[f32],
    k: usize,
    n: usize,
    blocks: &[Range<usize>],
    scale: f32,
    sink: &mut S,
    rows: usize,
) {
    product_tiled::<S, 6, 16>(left, right, k, n, blocks, scale, sink, rows);
}

/// Elements of `right` per column panel (`k × panel` ≈ 128 KiB), so that the panel stays in
/// L2 while every row of the block streams past it.
const PANEL_ELEMS: usize = 32 * 1024;

/// Register tiles of `MR` rows × `NR` columns: each loaded element of `right` is used `MR`
/// times, each broadcast element of `left` `NR` times.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn product_tiled<S: Sink, const MR: usize, const NR: usize>(
    left: &[f32],
    right: &[f32],
    k: usize,
    n: usize,
    blocks: &[Range<usize>],
    scale: f32,
    sink: &mut S,
    rows: usize,
) {
    if n == 0 {
        return;
    }
    let panel = ((PANEL_ELEMS / k.max(1)).max(NR) / NR * NR).min(n.div_ceil(NR) * NR);
    let mut j0 = 0;
    while j0 < n {
        let j1 = n.min(j0 + panel);
        let mut q = 0;
        while q + MR <= rows {
            tile::<S, MR, NR>(left, right, k, n, q, j0..j1, blocks, scale, sink);
            q += MR;
        }
        while q < rows {
            tile::<S, 1, NR>(left, right, k, n, q, j0..j1, blocks, scale, sink);
            q += 1;
        }
        j0 = j1;
    }
}

/// Output rows `row0..row0+Q`, columns `cols`.
///
/// Each block's partial sums live in registers and are added left to right (MKL's
/// `(b0 + b1) + b2`); the total is scaled and handed to the sink.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<S: Sink, const Q: usize, const NR: usize>(
    left: &[f32],
    right: &[f32],
    k: usize,
    n: usize,
    row0: usize,
    cols: Range<usize>,
    blocks: &[Range<usize>],
    scale: f32,
    sink: &mut S,
) {
    let mut lrows: [&[f32]; Q] = [&[]; Q];
    for (q, l) in lrows.iter_mut().enumerate() {
        *l = &left[(row0 + q) * k..(row0 + q + 1) * k];
    }
    let full_end = cols.start + (cols.end - cols.start) / NR * NR;
    let mut j = cols.start;
    while j < full_end {
        let mut tot = [[0f32; NR]; Q];
        for (bi, blk) in blocks.iter().enumerate() {
            let mut acc = [[0f32; NR]; Q];
            for kk in blk.clone() {
                let rr: &[f32] = &right[kk * n + j..kk * n + j + NR];
                for q in 0..Q {
                    let c = lrows[q][kk];
                    for t in 0..NR {
                        acc[q][t] = c.mul_add(rr[t], acc[q][t]);
                    }
                }
            }
            if bi == 0 {
                tot = acc;
            } else {
                for q in 0..Q {
                    for t in 0..NR {
                        tot[q][t] += acc[q][t];
                    }
                }
            }
        }
        for (q, row) in tot.iter_mut().enumerate() {
            for x in row.iter_mut() {
                *x *= scale;
            }
            sink.put(row0 + q, j, row);
        }
        j += NR;
    }
    // Column tail: the same operations, one column at a time.
    for j in full_end..cols.end {
        for (q, l) in lrows.iter().enumerate() {
            let mut tot = 0f32;
            for (bi, blk) in blocks.iter().enumerate() {
                let mut acc = 0f32;
                for kk in blk.clone() {
                    acc = l[kk].mul_add(right[kk * n + j], acc);
                }
                tot = if bi == 0 { acc } else { tot + acc };
            }
            sink.put_one(row0 + q, j, tot * scale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(left: &[f32], right: &[f32], m: usize, k: usize, n: usize, scale: f32) -> Vec<f32> {
        let blocks = active_k_blocks(k);
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut tot = 0f32;
                for (bi, b) in blocks.iter().enumerate() {
                    let mut acc = 0f32;
                    for kk in b.clone() {
                        acc = left[i * k + kk].mul_add(right[kk * n + j], acc);
                    }
                    tot = if bi == 0 { acc } else { tot + acc };
                }
                out[i * n + j] = tot * scale;
            }
        }
        out
    }

    #[test]
    fn tiled_kernel_equals_scalar_reference() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 17),
            (9, 8, 33),
            (4, 16, 16),
            (7, 200, 40),
            (6, 513, 19),
        ] {
            let l: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let r: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let got = lowrank_product(&l, &r, m, k, n, 0.37).unwrap();
            let want = naive(&l, &r, m, k, n, 0.37);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{m}x{k}x{n}"
            );
        }
        assert!(lowrank_product(&[1.0], &[1.0, 2.0], 1, 1, 3, 1.0).is_err());
    }

    #[test]
    fn every_kernel_width_gives_the_same_bits() {
        // The run-time dispatch may pick the AVX2+FMA build; the portable build (libm `fmaf`)
        // must give the same bits.
        let (m, k, n) = (19, 300, 75);
        let l: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
            .collect();
        let r: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 1000) as f32 / 991.0 - 0.5)
            .collect();
        let blocks = active_k_blocks(k);
        let run = |f: &dyn Fn(&mut StoreF32)| {
            let mut out = vec![0f32; m * n];
            f(&mut StoreF32 { out: &mut out, n });
            out
        };
        let portable = run(&|s| product_tiled::<_, 6, 16>(&l, &r, k, n, &blocks, 0.5, s, m));
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut variants = vec![(
            "dispatched",
            run(&|s| product_into(&l, &r, k, n, &blocks, 0.5, s, m)),
        )];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("avx2")
            {
                // SAFETY: detected just above.
                let v = run(&|s| unsafe { product_avx2(&l, &r, k, n, &blocks, 0.5, s, m) });
                variants.push(("avx2", v));
            }
        }
        for (name, v) in variants {
            assert!(
                v.iter()
                    .zip(&portable)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} differs from the portable kernel"
            );
        }
    }
}
