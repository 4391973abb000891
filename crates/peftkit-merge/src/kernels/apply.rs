//! Row-block engine shared by the kernels: decode a block of base rows, let the kernel update
//! them in a wide float type, round once to the base dtype, check finiteness, encode.
//!
//! Blocks are independent and the arithmetic inside a row never depends on the block split,
//! so results are identical for any number of rayon threads.

use rayon::prelude::*;
use safetensors::Dtype;

use peftkit_checkpoint::nonfinite;

use super::dtype::{
    decode_f32_into, decode_f64_into, element_size, encode_f32_into, encode_f64_into,
    encode_scaled_into,
};
use super::error::{check_len, numel, MergeMathError, Result};

/// A block of decoded base rows, in the type torch computes the merge in: `f32` for
/// F32/BF16/F16 bases (torch's op-math type), `f64` for F64 bases.
pub(crate) enum Rows<'a> {
    /// F32, BF16 or F16 base.
    F32(&'a mut [f32]),
    /// F64 base.
    F64(&'a mut [f64]),
}

/// What a kernel found out about the finiteness of the bytes it wrote, for the merge's
/// non-finite check (`stream::MergeEdit`): the fused kernel tests each block of rows right
/// after writing it, while it is in cache, so the merge need not read the tensor once more.
#[derive(Debug, Default)]
pub(crate) struct FiniteProbe(std::sync::atomic::AtomicU8);

impl FiniteProbe {
    const UNKNOWN: u8 = 0;
    const FINITE: u8 = 1;
    const NOT_FINITE: u8 = 2;

    /// Forgets what an earlier kernel found (each step rewrites the tensor).
    pub(crate) fn reset(&self) {
        self.0
            .store(Self::UNKNOWN, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records that the kernel wrote every byte and checked them: `finite` when none is NaN
    /// or infinite.
    pub(crate) fn record(&self, finite: bool) {
        let v = if finite {
            Self::FINITE
        } else {
            Self::NOT_FINITE
        };
        self.0.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the last kernel checked every byte it wrote and found them all finite.
    pub(crate) fn all_finite(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) == Self::FINITE
    }
}

/// Where a streamed base tensor's bytes are read from (see [`BlockIo`]): block by block, right
/// before the kernel updates the block, so each block is read while it is in cache
/// (docs/architecture.md, "Output IO").
pub(crate) trait BaseSource: Sync {
    /// Reads the base bytes `at..at + into.len()` into `into`. `false` when they could not be
    /// read; the source keeps the cause for its owner, and the kernel stops with
    /// [`MergeMathError::BaseUnread`].
    fn fill(&self, at: usize, into: &mut [u8]) -> bool;
}

/// A base tensor streamed through a kernel block by block: each block is read with
/// [`BaseSource::fill`], merged, and handed back with [`BlockIo::flush`] (the merge writes it to
/// the output file), so no buffer ever holds the whole tensor.
pub(crate) trait BlockIo: BaseSource {
    /// Takes the merged bytes `at..at + bytes.len()`. `false` when they could not be written;
    /// the caller keeps the cause, as for [`BaseSource::fill`].
    fn flush(&self, at: usize, bytes: &[u8]) -> bool;
}

/// Base bytes a streamed block holds: about 1 MiB, so that a block is merged and written back
/// while it is in cache and each column panel of a low-rank factor is reused by many rows.
pub(crate) const STREAM_BLOCK_BYTES: usize = 1 << 20;

thread_local! {
    /// A streamed block, one per thread ([`with_kept`]).
    static BLOCK: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer `kept`, kept from call to call: rayon's `map_init` would
/// make (and zero, and fault in) one per split of the work. Taken and put back rather than
/// borrowed, because a thread waiting inside a nested parallel loop may start another chunk
/// (which then takes an empty buffer).
pub(crate) fn with_kept<T: Default, R>(
    kept: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut buf = kept.take();
    let result = f(&mut buf);
    kept.set(buf);
    result
}

/// Streams a base tensor of `len` bytes through `merge` in blocks of `block` bytes, in
/// parallel: each block is read from `io` into a per-thread buffer, merged there
/// (`merge(offset, bytes)` says whether it is finite) and written back to `io` while it is in
/// cache, so no buffer of the tensor's size is ever held (docs/architecture.md, "Output IO").
/// A failed read or write is `unread()` (`io` keeps the cause).
pub(crate) fn stream_blocks<E: Send>(
    io: &dyn BlockIo,
    (len, block): (usize, usize),
    unread: impl Fn() -> E + Sync,
    merge: impl Fn(usize, &mut [u8]) -> std::result::Result<bool, E> + Sync,
) -> std::result::Result<bool, E> {
    (0..len.div_ceil(block.max(1)))
        .into_par_iter()
        .map(|bi| {
            let at = bi * block;
            with_kept(&BLOCK, |buf| {
                let n = block.min(len - at);
                if buf.len() < n {
                    buf.resize(n, 0);
                }
                let buf = &mut buf[..n];
                if !io.fill(at, buf) {
                    return Err(unread());
                }
                let finite = merge(at, buf)?;
                if !io.flush(at, buf) {
                    return Err(unread());
                }
                Ok(finite)
            })
        })
        .try_reduce(|| true, |a, b| Ok(a && b))
}

/// A base tensor to update in place: raw little-endian bytes of `dtype` with `shape`.
#[derive(Debug)]
pub struct BaseTensorMut<'a> {
    /// Element type of `data`: F32, BF16, F16 or (where a kernel says so) F64.
    pub dtype: Dtype,
    /// Row-major shape.
    pub shape: &'a [usize],
    /// The tensor's bytes, updated in place.
    pub data: &'a mut [u8],
    /// Where a kernel that checks its output as it writes says what it found.
    pub(crate) probe: Option<&'a FiniteProbe>,
}

impl<'a> BaseTensorMut<'a> {
    /// Bundles the three parts; nothing is checked until a kernel uses it.
    pub fn new(dtype: Dtype, shape: &'a [usize], data: &'a mut [u8]) -> Self {
        BaseTensorMut {
            dtype,
            shape,
            data,
            probe: None,
        }
    }

    /// The same, telling `probe` whether the bytes written are finite, where the kernel
    /// checks as it writes.
    pub(crate) fn with_probe(mut self, probe: &'a FiniteProbe) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Checks dtype support and that the byte length matches the shape; returns `numel`.
    pub(crate) fn validate(&self, what: &'static str, allow_f64: bool) -> Result<usize> {
        match self.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => {}
            Dtype::F64 if allow_f64 => {}
            other => return Err(MergeMathError::UnsupportedDtype { what, dtype: other }),
        }
        let size = element_size(self.dtype)?;
        if !self.data.len().is_multiple_of(size) {
            return Err(MergeMathError::ByteLength {
                what,
                dtype: self.dtype,
                len: self.data.len(),
            });
        }
        check_len(what, self.shape, self.data.len() / size)?;
        numel(what, self.shape)
    }
}

/// A read-only row-major `f32` tensor (an adapter factor, already widened to f32 as peft's
/// default `autocast_adapter_dtype=True` does).
#[derive(Debug, Clone, Copy)]
pub struct F32Tensor<'a> {
    /// Row-major shape.
    pub shape: &'a [usize],
    /// `product(shape)` values.
    pub data: &'a [f32],
}

impl<'a> F32Tensor<'a> {
    /// Bundles shape and data; nothing is checked until a kernel uses it.
    pub fn new(shape: &'a [usize], data: &'a [f32]) -> Self {
        F32Tensor { shape, data }
    }

    /// Checks that the data length matches the shape.
    pub(crate) fn validate(&self, what: &'static str) -> Result<()> {
        check_len(what, self.shape, self.data.len())
    }
}

/// Elements per rayon task (1 MiB of f32): large enough that each column panel of the low-rank
/// factor is reused by many rows, small enough to keep a few tasks per thread on big tensors.
pub(crate) const BLOCK_ELEMS: usize = 1 << 18;

/// Runs `update(first_row, rows, scratch)` over blocks of whole rows of `base` (viewed as
/// `n_rows × row_len`), then rounds to the base dtype and writes back.
///
/// With `check_finite`, every rounded value is checked and a [`MergeMathError::NonFinite`]
/// naming the first bad flat index is returned after all blocks ran (the buffer is then
/// partially merged and must be discarded, as peft discards its clone).
///
/// `scratch` is a per-thread buffer the update may resize and reuse (e.g. for delta rows), so
/// that large tensors do not allocate (and page-fault) a fresh buffer per block.
pub(crate) fn update_rows<F>(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    row_len: usize,
    check_finite: bool,
    update: F,
) -> Result<()>
where
    F: Fn(usize, Rows<'_>, &mut Vec<f32>) -> Result<()> + Sync,
{
    let dtype = base.dtype;
    let blocks = row_blocks(what, base, row_len, true, |first_row, bytes, buffers| {
        let RowBuffers {
            vals: vals32,
            vals64,
            scratch,
            ..
        } = buffers;
        let n = bytes.len() / element_size(dtype)?;
        if dtype == Dtype::F64 {
            vals64.resize(n, 0.0);
            let vals = &mut vals64[..n];
            decode_f64_into(what, dtype, bytes, vals)?;
            update(first_row, Rows::F64(vals), scratch)?;
            encode_f64_into(what, dtype, vals, bytes)?;
        } else {
            vals32.resize(n, 0.0);
            let vals = &mut vals32[..n];
            decode_f32_into(what, dtype, bytes, vals)?;
            update(first_row, Rows::F32(vals), scratch)?;
            encode_f32_into(what, dtype, vals, bytes)?;
        }
        // The stored bytes are what is checked: rounding can overflow to Inf (e.g. above the
        // BF16 maximum).
        Ok(check_finite.then(|| nonfinite(dtype, bytes)).flatten())
    })?;
    blocks.refuse(what)
}

/// Like [`update_rows`] for F32, BF16 and F16 bases, where the update also leaves one factor
/// per row in `factors` (its third argument): each row is written back multiplied by its
/// factor, `fl_dtype(fl32(f · x))`, the multiply, the rounding and the finiteness test in one
/// pass (DoRA's `m / ‖W + Δ‖`; see `dora.rs`). Tells the base's probe whether every value
/// written is finite.
pub(crate) fn update_rows_scaled<F>(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    row_len: usize,
    check_finite: bool,
    update: F,
) -> Result<()>
where
    F: Fn(usize, &mut [f32], &mut Vec<f32>, &mut Vec<f32>) -> Result<()> + Sync,
{
    let dtype = base.dtype;
    let blocks = row_blocks(what, base, row_len, false, |first_row, bytes, buffers| {
        let RowBuffers {
            vals,
            factors,
            scratch,
            ..
        } = buffers;
        let n = bytes.len() / element_size(dtype)?;
        vals.resize(n, 0.0);
        let vals = &mut vals[..n];
        decode_f32_into(what, dtype, bytes, vals)?;
        factors.clear();
        update(first_row, vals, factors, scratch)?;
        if factors.len() * row_len != n {
            return Err(MergeMathError::Invalid {
                what,
                reason: format!("{} row factors for {} rows", factors.len(), n / row_len),
            });
        }
        let finite = encode_scaled_into(what, dtype, (vals, row_len), factors, bytes)?;
        // The scan counts and finds the first only where the pass found one.
        Ok((!finite).then(|| nonfinite(dtype, bytes)).flatten())
    })?;
    if let Some(probe) = base.probe {
        probe.record(blocks.first.is_none());
    }
    match check_finite {
        true => blocks.refuse(what),
        false => Ok(()),
    }
}

/// What [`row_blocks`] found: how many stored values are NaN or infinite, and the flat index of
/// the first (for the blocks whose body looked).
struct NonFinite {
    count: usize,
    first: Option<usize>,
}

impl NonFinite {
    /// [`MergeMathError::NonFinite`] when any value was.
    fn refuse(self, what: &'static str) -> Result<()> {
        match self.first {
            Some(first) => Err(MergeMathError::NonFinite {
                what,
                count: self.count,
                first,
            }),
            None => Ok(()),
        }
    }
}

/// The per-thread buffers of [`row_blocks`]: decoded rows, a kernel's scratch and
/// [`update_rows_scaled`]'s row factors.
#[derive(Default)]
struct RowBuffers {
    vals: Vec<f32>,
    vals64: Vec<f64>,
    scratch: Vec<f32>,
    factors: Vec<f32>,
}

thread_local! {
    /// [`RowBuffers`], one per thread, kept from block to block ([`with_kept`]).
    static ROW_BUFFERS: std::cell::Cell<RowBuffers> = const {
        std::cell::Cell::new(RowBuffers {
            vals: Vec::new(),
            vals64: Vec::new(),
            scratch: Vec::new(),
            factors: Vec::new(),
        })
    };
}

/// Runs `body(first_row, bytes, buffers)` in parallel over blocks of whole rows of `base`
/// (`buffers` this thread's), each returning the count of non-finite values it stored and the
/// index of the first within its block; sums them after every block ran.
fn row_blocks<B>(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    row_len: usize,
    allow_f64: bool,
    body: B,
) -> Result<NonFinite>
where
    B: Fn(usize, &mut [u8], &mut RowBuffers) -> Result<Option<(usize, usize)>> + Sync,
{
    let total = base.validate(what, allow_f64)?;
    let mut found = NonFinite {
        count: 0,
        first: None,
    };
    if total == 0 || row_len == 0 {
        return Ok(found);
    }
    if total % row_len != 0 {
        return Err(MergeMathError::Invalid {
            what,
            reason: format!("{total} elements do not split into rows of {row_len}"),
        });
    }
    // Multiples of 4 rows keep the GEMM's 4-row tiles whole.
    let rows_per_block = (BLOCK_ELEMS / row_len).max(1).div_ceil(4) * 4;
    let block_bytes = rows_per_block * row_len * element_size(base.dtype)?;
    let results: Vec<Result<Option<(usize, usize)>>> = base
        .data
        .par_chunks_mut(block_bytes)
        .enumerate()
        .map(|(bi, bytes)| {
            let first_row = bi * rows_per_block;
            let bad = with_kept(&ROW_BUFFERS, |buffers| body(first_row, bytes, buffers))?;
            Ok(bad.map(|(count, at)| (count, first_row * row_len + at)))
        })
        .collect();
    for r in results {
        if let Some((count, at)) = r? {
            found.count += count;
            found.first.get_or_insert(at);
        }
    }
    Ok(found)
}

/// A base held in memory, as a [`BaseSource`] and a [`BlockIo`] that collects the blocks
/// written back (over bytes that no merge writes), for tests of the streamed paths.
#[cfg(test)]
pub(crate) struct MemoryBlocks<'a> {
    base: &'a [u8],
    out: std::sync::Mutex<Vec<u8>>,
}

#[cfg(test)]
impl<'a> MemoryBlocks<'a> {
    pub(crate) fn new(base: &'a [u8]) -> Self {
        let out = std::sync::Mutex::new(vec![0x5A; base.len()]);
        MemoryBlocks { base, out }
    }

    /// What was written back.
    pub(crate) fn written(self) -> Vec<u8> {
        self.out.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
impl BaseSource for MemoryBlocks<'_> {
    fn fill(&self, at: usize, into: &mut [u8]) -> bool {
        into.copy_from_slice(&self.base[at..at + into.len()]);
        true
    }
}

#[cfg(test)]
impl BlockIo for MemoryBlocks<'_> {
    fn flush(&self, at: usize, bytes: &[u8]) -> bool {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out[at..at + bytes.len()].copy_from_slice(bytes);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dtype::{decode_f32, encode_f32};

    /// Over several blocks, the refusal counts every stored non-finite value and names the
    /// first, including a finite `f32` that rounds to infinity in BF16; without the check the
    /// rows are written back all the same.
    #[test]
    fn update_rows_counts_what_it_stores() {
        // Rows of 1024: blocks of 256 rows, so the three marks lie in three blocks.
        let (rows, cols) = (600, 1024);
        let marks: [(usize, usize, f32); 3] = [
            (300, 5, f32::NAN),
            (550, 0, 3.4e38),
            (599, 1023, f32::NEG_INFINITY),
        ];
        let update = |first_row: usize, rows: Rows<'_>, _: &mut Vec<f32>| {
            let Rows::F32(w) = rows else { unreachable!() };
            for (r, c, v) in marks {
                if let Some(x) = r
                    .checked_sub(first_row)
                    .and_then(|r| w.get_mut(r * cols + c))
                {
                    *x = v;
                }
            }
            Ok(())
        };
        for (dtype, count) in [(Dtype::BF16, 3), (Dtype::F32, 2)] {
            let vals: Vec<f32> = (0..rows * cols).map(|i| (i % 97) as f32).collect();
            let mut data = encode_f32("w", dtype, &vals).unwrap();
            let shape = [rows, cols];
            let mut base = BaseTensorMut::new(dtype, &shape, &mut data);
            let err = update_rows("w", &mut base, cols, true, update).unwrap_err();
            let first = 300 * cols + 5;
            assert_eq!(
                err,
                MergeMathError::NonFinite {
                    what: "w",
                    count,
                    first
                }
            );
            let mut base = BaseTensorMut::new(dtype, &shape, &mut data);
            update_rows("w", &mut base, cols, false, update).unwrap();
            let got = decode_f32("w", dtype, &data).unwrap();
            assert!(got[first].is_nan());
            assert_eq!(got[599 * cols + 1023], f32::NEG_INFINITY);
        }
    }
}
