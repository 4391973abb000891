//! Row-block engine shared by the kernels: decode a block of base rows, let the kernel update
//! them in a wide float type, round once to the base dtype, check finiteness, encode.
//!
//! Blocks are independent and the arithmetic inside a row never depends on the block split,
//! so results are identical for any number of rayon threads.

use rayon::prelude::*;
use safetensors::Dtype;

use super::dtype::{
    decode_f32_into, decode_f64_into, element_size, encode_f32_into, encode_f64_into,
    round_slice_to,
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
pub(crate) fn with_kept<T, R>(
    kept: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    f: impl FnOnce(&mut Vec<T>) -> R,
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
const BLOCK_ELEMS: usize = 1 << 18;

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
    let total = base.validate(what, true)?;
    if total == 0 || row_len == 0 {
        return Ok(());
    }
    if total % row_len != 0 {
        return Err(MergeMathError::Invalid {
            what,
            reason: format!("{total} elements do not split into rows of {row_len}"),
        });
    }
    let dtype = base.dtype;
    let size = element_size(dtype)?;
    // Multiples of 4 rows keep the GEMM's 4-row tiles whole.
    let rows_per_block = (BLOCK_ELEMS / row_len).max(1).div_ceil(4) * 4;
    let block_bytes = rows_per_block * row_len * size;

    let results: Vec<Result<Option<(usize, usize)>>> = base
        .data
        .par_chunks_mut(block_bytes)
        .enumerate()
        .map_init(
            || (Vec::<f32>::new(), Vec::<f64>::new(), Vec::<f32>::new()),
            |(vals32, vals64, scratch), (bi, bytes)| {
                let first_row = bi * rows_per_block;
                let n = bytes.len() / size;
                let mut bad: Option<(usize, usize)> = None;
                let mut note = |i: usize| {
                    let flat = first_row * row_len + i;
                    bad = Some(match bad {
                        None => (1, flat),
                        Some((c, f)) => (c + 1, f),
                    });
                };
                if dtype == Dtype::F64 {
                    vals64.resize(n, 0.0);
                    let vals = &mut vals64[..n];
                    decode_f64_into(what, dtype, bytes, vals)?;
                    update(first_row, Rows::F64(vals), scratch)?;
                    if check_finite {
                        for (i, v) in vals.iter().enumerate() {
                            if !v.is_finite() {
                                note(i);
                            }
                        }
                    }
                    encode_f64_into(what, dtype, vals, bytes)?;
                } else {
                    vals32.resize(n, 0.0);
                    let vals = &mut vals32[..n];
                    decode_f32_into(what, dtype, bytes, vals)?;
                    update(first_row, Rows::F32(vals), scratch)?;
                    if check_finite {
                        // Rounding can overflow to Inf (e.g. above the BF16 maximum), so check the
                        // value that will be stored.
                        round_slice_to(dtype, vals)?;
                        for (i, v) in vals.iter().enumerate() {
                            if !v.is_finite() {
                                note(i);
                            }
                        }
                    }
                    encode_f32_into(what, dtype, vals, bytes)?;
                }
                Ok(bad)
            },
        )
        .collect();

    let mut count = 0usize;
    let mut first = None;
    for r in results {
        if let Some((c, f)) = r? {
            count += c;
            first.get_or_insert(f);
        }
    }
    match first {
        Some(first) => Err(MergeMathError::NonFinite { what, count, first }),
        None => Ok(()),
    }
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
