//! The merge `W ← fl(f32(W) + Δ)` with `Δ` never written to memory.
//!
//! The general path ([`super::apply`]) decodes a block of base rows to `f32`, writes the delta
//! rows to a scratch buffer, adds, and encodes: four passes over memory per element. For a merge
//! with an f32 adapter (LoRA on a Linear, `Conv1D`, embedding or experts) this module instead
//! lets the GEMM kernel add each finished register tile of `Δ` to the base bytes in place: with
//! the hand-written AVX-512 kernel ([`super::avx512`]) or, without AVX-512, the AVX2 one
//! ([`super::avx2`]) for F32/BF16/F16 bases, else with the generic kernel and an adding
//! [`Sink`] for F32/BF16 (for F16 the generic version was slower than the general path, which
//! it then keeps). The operations on every element are those of the general path
//! (`Δ = fl32(P · s)`, rounded to the base dtype first where peft rounds it
//! ([`Fused::round_first`]: `safe_merge`, embeddings, experts, 2-D `target_parameters`), one add
//! in f32, one rounding), so the bits are the same; a test checks it.

use std::marker::PhantomData;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use super::apply::{stream_blocks, BlockIo, STREAM_BLOCK_BYTES};
use super::dtype::{bf16_bits_to_f32, decode_le, encode_le, f32_to_bf16_bits};
use super::gemm::{product_into, Product, Sink};

/// One low-rank update of a fused add: `Δ` of `product`, reduced over the rank in `blocks`
/// (MKL's order), rounded to the base dtype before the add when `round_first` (as peft's
/// `safe_merge` and some layers round it).
pub(crate) struct Fused<'a> {
    pub product: Product<'a>,
    pub blocks: &'a [Range<usize>],
    pub round_first: bool,
}

/// Adds the `Δ` of each update of `chain`, in order, to the base in `target`, block of rows by
/// block of rows (see [`Target`]): each block gets every update while it is in cache, with the
/// same operations per element as updating the whole tensor once per update. With `check`,
/// each block is tested for NaN and infinity right after its last update. Returns
/// `Some(false)` when a tested block holds one, `Some(true)` otherwise, or `None`, having done
/// nothing, when the base dtype has no fused path on this CPU or `chain` is empty (the caller
/// then takes the general path).
///
/// The caller has checked the shapes: the base holds `batch·rows × n` elements for every
/// update, all with the same `n`.
pub(crate) fn add_in_place(
    chain: &[Fused<'_>],
    dtype: Dtype,
    target: Target<'_>,
    check: bool,
) -> Result<Option<bool>, Unread> {
    let Some(first) = chain.first() else {
        return Ok(None);
    };
    let seg = Segments {
        chain,
        n: first.product.n,
        dtype,
        test: check.then_some(dtype),
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(ty) = super::avx512::BaseType::of(dtype) {
        if super::avx512::available() {
            return seg
                .run(target, |u, left, right, rows, bytes| {
                    let p = &u.product;
                    let shape = (rows, p.k, p.n);
                    super::avx512::add_rows(
                        ty,
                        left,
                        right,
                        shape,
                        u.blocks,
                        p.scale,
                        u.round_first,
                        bytes,
                    )
                })
                .map(Some);
        }
        if super::avx2::available() {
            return seg
                .run(target, |u, left, right, rows, bytes| {
                    let p = &u.product;
                    let shape = (rows, p.k, p.n);
                    super::avx2::add_rows(
                        ty,
                        left,
                        right,
                        shape,
                        u.blocks,
                        p.scale,
                        u.round_first,
                        bytes,
                    )
                })
                .map(Some);
        }
    }
    match dtype {
        Dtype::BF16 => seg.add_with_sink::<Bf16>(target).map(Some),
        Dtype::F32 => seg.add_with_sink::<F32>(target).map(Some),
        _ => Ok(None),
    }
}

/// Where a fused add finds the base and leaves the result.
pub(crate) enum Target<'a> {
    /// In memory, where the base is updated in place.
    Memory(&'a mut [u8]),
    /// Nowhere in memory: each block of `len` base bytes is read from `io` into a small
    /// buffer, merged there and written back to `io` while it is in cache, so a tensor costs
    /// two copies in cache and no buffer of its size (docs/architecture.md, "Output IO").
    Streamed { len: usize, io: &'a dyn BlockIo },
}

/// The base could not be read from, or the result written to, its [`BlockIo`] (which keeps the cause).
#[derive(Debug)]
pub(crate) struct Unread;

/// How a fused add walks the base: the updates, the row length, the base dtype and whether
/// blocks are tested for NaN/Inf (`test`).
struct Segments<'a> {
    chain: &'a [Fused<'a>],
    n: usize,
    dtype: Dtype,
    test: Option<Dtype>,
}

impl Segments<'_> {
    /// The fused path without the hand-written kernels: F32 and BF16 only.
    fn add_with_sink<E: Elem>(&self, target: Target<'_>) -> Result<bool, Unread> {
        self.run(target, |u, left, right, rows, bytes| {
            let p = &u.product;
            let mut sink = AddInto::<E> {
                bytes,
                n: p.n,
                round_first: u.round_first,
                elem: PhantomData,
            };
            product_into(left, right, p.k, p.n, u.blocks, p.scale, &mut sink, rows);
        })
    }

    /// Splits the base into blocks of whole rows run in parallel (filled or read and written
    /// back as `target` says); for each update, splits each block at batch-entry boundaries
    /// (experts) and calls `f(update, left rows, right factor, row count, base bytes)` per
    /// piece. With `test`, checks each block for NaN and infinity as soon as it is done;
    /// returns `Ok(false)` when one holds some.
    fn run<F>(&self, target: Target<'_>, f: F) -> Result<bool, Unread>
    where
        F: Fn(&Fused<'_>, &[f32], &[f32], usize, &mut [u8]) + Sync,
    {
        let row_bytes = self.n * (self.dtype.bitsize() / 8);
        if row_bytes == 0 {
            return Ok(true);
        }
        // Multiples of 8 rows keep the kernels' row tiles whole.
        let block = (STREAM_BLOCK_BYTES / row_bytes).max(1).div_ceil(8) * 8 * row_bytes;
        let merge =
            |first_row: usize, bytes: &mut [u8]| self.block(first_row, row_bytes, bytes, &f);
        match target {
            Target::Memory(data) => Ok(data
                .par_chunks_mut(block)
                .enumerate()
                .map(|(bi, bytes)| merge(bi * block / row_bytes, bytes))
                .reduce(|| true, |a, b| a && b)),
            Target::Streamed { len, io } => stream_blocks(
                io,
                (len, block),
                || Unread,
                |at, buf| Ok(merge(at / row_bytes, buf)),
            ),
        }
    }

    /// Applies every update to one block of whole rows, `bytes`, whose first row is `first`;
    /// whether it is finite (when tested).
    fn block<F>(&self, first: usize, row_bytes: usize, bytes: &mut [u8], f: &F) -> bool
    where
        F: Fn(&Fused<'_>, &[f32], &[f32], usize, &mut [u8]),
    {
        let end = first + bytes.len() / row_bytes;
        for u in self.chain {
            let p = &u.product;
            let (k, n) = (p.k, p.n);
            let mut g = first;
            while g < end {
                let e = g / p.rows.max(1);
                let seg_end = end.min((e + 1) * p.rows);
                f(
                    u,
                    &p.left[g * k..seg_end * k],
                    &p.right[e * k * n..(e + 1) * k * n],
                    seg_end - g,
                    &mut bytes[(g - first) * row_bytes..(seg_end - first) * row_bytes],
                );
                g = seg_end;
            }
        }
        self.test
            .is_none_or(|d| peftkit_checkpoint::nonfinite(d, bytes).is_none())
    }
}

/// A base element type the generic sink adds into.
trait Elem {
    const SIZE: usize;
    /// Decodes `out.len()` little-endian elements from `bytes`.
    fn decode(bytes: &[u8], out: &mut [f32]);
    /// Encodes `vals` into `bytes`, rounding as torch does.
    fn encode(vals: &[f32], bytes: &mut [u8]);
    /// `v` rounded to this type and widened back (exact).
    fn round(v: f32) -> f32;
}

struct F32;
struct Bf16;

impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        decode_le(bytes, out, f32::from_le_bytes);
    }
    #[inline(always)]
    fn encode(vals: &[f32], bytes: &mut [u8]) {
        encode_le(vals, bytes, f32::to_le_bytes);
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        decode_le(bytes, out, |b| bf16_bits_to_f32(u16::from_le_bytes(b)));
    }
    #[inline(always)]
    fn encode(vals: &[f32], bytes: &mut [u8]) {
        encode_le(vals, bytes, |v| f32_to_bf16_bits(v).to_le_bytes());
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        bf16_bits_to_f32(f32_to_bf16_bits(v))
    }
}

/// Adds finished product elements into row-major base bytes of element type `E`.
struct AddInto<'a, E> {
    bytes: &'a mut [u8],
    n: usize,
    round_first: bool,
    elem: PhantomData<E>,
}

impl<E: Elem> Sink for AddInto<'_, E> {
    #[inline(always)]
    fn put<const W: usize>(&mut self, row: usize, col: usize, vals: &[f32; W]) {
        let (at, round) = ((row * self.n + col) * E::SIZE, self.round_first);
        let dst = &mut self.bytes[at..at + W * E::SIZE];
        let mut w = [0f32; W];
        E::decode(dst, &mut w);
        for (x, d) in w.iter_mut().zip(vals) {
            *x += delta::<E>(*d, round);
        }
        E::encode(&w, dst);
    }

    #[inline(always)]
    fn put_one(&mut self, row: usize, col: usize, val: f32) {
        let (at, round) = ((row * self.n + col) * E::SIZE, self.round_first);
        let dst = &mut self.bytes[at..at + E::SIZE];
        let mut w = [0f32; 1];
        E::decode(dst, &mut w);
        w[0] += delta::<E>(val, round);
        E::encode(&w, dst);
    }
}

/// `d` as [`AddInto`] adds it: rounded to the base type first when `round_first`.
#[inline(always)]
fn delta<E: Elem>(d: f32, round_first: bool) -> f32 {
    match round_first {
        true => E::round(d),
        false => d,
    }
}

#[cfg(test)]
mod tests {
    use super::super::apply::{BaseSource, MemoryBlocks};
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

    /// The general path's arithmetic: decode, `Δ` into a buffer (rounded to `dtype` when
    /// `round_first`), add, encode.
    fn reference(
        p: &Product<'_>,
        (blocks, round_first): (&[Range<usize>], bool),
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
        if round_first {
            super::super::dtype::round_slice_to(dtype, &mut delta).unwrap();
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
        // split into several rayon blocks. Row counts leave every remainder of the AVX2 kernel's
        // 6-row tile (one call) and of the AVX-512 kernel's 8-row one.
        for &(batch, rows, k, n) in &[
            (1, 8, 16, 48),
            (1, 10, 16, 32),
            (1, 11, 16, 64),
            (1, 13, 20, 45),
            (2, 11, 7, 64),
            (1, 9, 400, 33),
            (3, 5, 16, 100),
            (1, 600, 16, 1000),
        ] {
            for round_first in [false, true] {
                fused_paths_agree((batch, rows, k, n), round_first);
            }
        }
    }

    /// [`fused_paths_equal_the_general_arithmetic`] for one shape.
    fn fused_paths_agree((batch, rows, k, n): (usize, usize, usize, usize), round_first: bool) {
        {
            let left = factor(batch * rows * k, 1);
            let right = factor(batch * k * n, 2);
            let blocks = active_k_blocks(k);
            let update = [Fused {
                product: Product {
                    left: &left,
                    right: &right,
                    rows,
                    k,
                    n,
                    scale: 0.75,
                },
                blocks: &blocks,
                round_first,
            }];
            let p = &update[0].product;
            for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
                let base = encode_f32("base", dtype, &base_values(batch * rows * n)).unwrap();
                let want = reference(p, (&blocks, round_first), batch, dtype, &base);
                let mut paths: Vec<(&str, Vec<u8>)> = Vec::new();
                let mut got = base.clone();
                let seg = Segments {
                    chain: &update,
                    n,
                    dtype,
                    test: None,
                };
                let generic = match dtype {
                    Dtype::BF16 => Some(seg.add_with_sink::<Bf16>(Target::Memory(&mut got))),
                    Dtype::F32 => Some(seg.add_with_sink::<F32>(Target::Memory(&mut got))),
                    _ => None,
                };
                if let Some(done) = generic {
                    done.unwrap();
                    paths.push(("generic", got));
                }
                // Streamed: read, merged and written back block by block.
                let io = MemoryBlocks::new(&base);
                let target = Target::Streamed {
                    len: base.len(),
                    io: &io,
                };
                if add_in_place(&update, dtype, target, false)
                    .unwrap()
                    .is_some()
                {
                    paths.push(("streamed", io.written()));
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
                        round_first,
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
                        round_first,
                        &mut got,
                    );
                    paths.push(("avx2 (one call)", got));
                }
                let mut got = base.clone();
                let fused = add_in_place(&update, dtype, Target::Memory(&mut got), true).unwrap();
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

    /// A source that cannot be read, or written back to, stops the kernel with `Unread`.
    #[test]
    fn an_unreadable_or_unwritable_source_stops_the_add() {
        struct Broken(bool);
        impl BaseSource for Broken {
            fn fill(&self, _: usize, _: &mut [u8]) -> bool {
                self.0
            }
        }
        impl BlockIo for Broken {
            fn flush(&self, _: usize, _: &[u8]) -> bool {
                false
            }
        }
        let (left, right) = (factor(8 * 4, 1), factor(4 * 16, 2));
        let blocks = active_k_blocks(4);
        let update = [Fused {
            product: Product {
                left: &left,
                right: &right,
                rows: 8,
                k: 4,
                n: 16,
                scale: 1.0,
            },
            blocks: &blocks,
            round_first: false,
        }];
        for readable in [false, true] {
            let io = Broken(readable);
            let target = Target::Streamed {
                len: 8 * 16 * 4,
                io: &io,
            };
            assert!(add_in_place(&update, Dtype::F32, target, false).is_err());
        }
    }

    /// Several updates applied block by block in one pass (a streamed merge of several
    /// adapters) give the bytes of applying each to the whole tensor in turn.
    #[test]
    fn a_chain_of_updates_equals_one_pass_per_update() {
        let (rows, n) = (600, 1000);
        let (l1, r1) = (factor(rows * 16, 3), factor(16 * n, 4));
        let (l2, r2) = (factor(rows * 5, 5), factor(5 * n, 6));
        let (b1, b2) = (active_k_blocks(16), active_k_blocks(5));
        let product = |left, right, k, scale| Product {
            left,
            right,
            rows,
            k,
            n,
            scale,
        };
        let chain = [
            Fused {
                product: product(&l1, &r1, 16, 0.5),
                blocks: &b1,
                round_first: false,
            },
            // Rounded first, as a `safe_merge` step is.
            Fused {
                product: product(&l2, &r2, 5, -2.0),
                blocks: &b2,
                round_first: true,
            },
        ];
        for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let base = encode_f32("base", dtype, &base_values(rows * n)).unwrap();
            let mut want = base.clone();
            let mut fused = true;
            for u in &chain {
                let one = [Fused {
                    product: product(
                        u.product.left,
                        u.product.right,
                        u.product.k,
                        u.product.scale,
                    ),
                    blocks: u.blocks,
                    round_first: u.round_first,
                }];
                let target = Target::Memory(&mut want);
                fused &= add_in_place(&one, dtype, target, false).unwrap().is_some();
            }
            if !fused {
                continue; // F16 without the hand-written kernels
            }
            let io = MemoryBlocks::new(&base);
            let target = Target::Streamed {
                len: base.len(),
                io: &io,
            };
            assert!(add_in_place(&chain, dtype, target, false)
                .unwrap()
                .is_some());
            assert!(io.written() == want, "{dtype:?}");
        }
    }
}
