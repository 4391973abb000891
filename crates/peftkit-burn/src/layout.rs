//! Tensors laid out on the host for burn and back: the transpose between torch's `[out, in]`
//! Linear weights and burn's `[in, out]`, fused with the float cast.
//!
//! Written here because burn-store's PyTorch adapters transpose element by element with a
//! `memcpy` call per element, which took 63 % of the cycles of loading a 1 GB checkpoint
//! (docs/benchmarks.md, "burn"), and no crate in the tree transposes byte buffers of a
//! run-time element width. The transpose goes a tile at a time, so that reads and writes both
//! stay within a few cache lines; a cast tensor is cast one band of rows at a time (by
//! peftkit-checkpoint's slice casts, told where the band sits) into a scratch buffer that stays
//! in cache, and transposed from there: the cast result is never written out whole.

use peftkit_checkpoint::{cast_slice_into, dtype_name, dtype_size, Dtype};

/// Bytes of one tile row: a cache line.
const TILE_BYTES: usize = 64;

/// Elements per side of a tile of `T`: one cache line of them, at least 8.
fn tile<T>() -> usize {
    (TILE_BYTES / size_of::<T>().max(1)).clamp(8, TILE_BYTES)
}

/// `dst[j * dst_stride + i] = src[i * src_stride + j]` for `i < rows`, `j < cols`, tile by
/// tile: each output row of a tile is written whole while the tile's input rows stay in
/// cache.
fn transpose_tiles<T: Copy>(
    src: &[T],
    src_stride: usize,
    [rows, cols]: [usize; 2],
    dst: &mut [T],
    dst_stride: usize,
) {
    let tile = tile::<T>();
    for i0 in (0..rows).step_by(tile) {
        let h = tile.min(rows - i0);
        for j0 in (0..cols).step_by(tile) {
            for j in j0..cols.min(j0 + tile) {
                let out = &mut dst[j * dst_stride + i0..j * dst_stride + i0 + h];
                for (k, o) in out.iter_mut().enumerate() {
                    *o = src[(i0 + k) * src_stride + j];
                }
            }
        }
    }
}

/// `src`, a row-major `[rows, cols]` matrix, transposed into `dst` (`[cols, rows]`).
pub(crate) fn transpose<T: Copy>(src: &[T], [rows, cols]: [usize; 2], dst: &mut [T]) {
    assert!(src.len() == rows * cols && dst.len() == rows * cols);
    transpose_tiles(src, cols, [rows, cols], dst, rows);
}

/// `src`, a row-major `[rows, cols]` tensor of `from`, cast to `to` (torch's rounding; `from`
/// and `to` may be equal) and, when `transposed`, transposed to `[cols, rows]`, written to
/// `out`, which holds `rows * cols` elements of `to`. Casts are between F32, F16 and BF16;
/// any dtype is copied or transposed as it is.
pub(crate) fn cast_transposed(
    name: &str,
    src: &[u8],
    (from, to): (Dtype, Dtype),
    matrix: [usize; 2],
    transposed: bool,
    out: &mut [u8],
) -> Result<(), String> {
    let width = |d: Dtype| {
        dtype_size(d).ok_or_else(|| format!("{name}: {} has no byte width", dtype_name(d)))
    };
    let numel = matrix[0] * matrix[1];
    if src.len() != numel * width(from)? || out.len() != numel * width(to)? {
        return Err(format!(
            "{name}: {} bytes of {} and {} bytes of {} do not hold a {matrix:?} matrix",
            src.len(),
            dtype_name(from),
            out.len(),
            dtype_name(to)
        ));
    }
    match width(to)? {
        1 => by_bands::<1>(name, src, (from, to), matrix, transposed, out),
        2 => by_bands::<2>(name, src, (from, to), matrix, transposed, out),
        4 => by_bands::<4>(name, src, (from, to), matrix, transposed, out),
        8 => by_bands::<8>(name, src, (from, to), matrix, transposed, out),
        w => Err(format!("{name}: elements of {w} bytes are not supported")),
    }
}

/// [`cast_transposed`] for output elements of `N` bytes; lengths are checked.
fn by_bands<const N: usize>(
    name: &str,
    src: &[u8],
    (from, to): (Dtype, Dtype),
    [rows, cols]: [usize; 2],
    transposed: bool,
    out: &mut [u8],
) -> Result<(), String> {
    let cast = |src: &[u8], first: usize, out: &mut [u8]| {
        cast_slice_into(name, src, from, to, first, rows * cols, out).map_err(|e| e.to_string())
    };
    match (transposed, from == to) {
        (false, true) => out.copy_from_slice(src),
        (false, false) => cast(src, 0, out)?,
        (true, true) => transpose(src.as_chunks::<N>().0, [rows, cols], out.as_chunks_mut().0),
        (true, false) => {
            let band_rows = tile::<[u8; N]>();
            let in_row = src.len() / rows.max(1);
            let mut scratch = vec![0u8; band_rows * cols * N];
            let out = out.as_chunks_mut::<N>().0;
            for r0 in (0..rows).step_by(band_rows) {
                let h = band_rows.min(rows - r0);
                let band = &mut scratch[..h * cols * N];
                cast(&src[r0 * in_row..(r0 + h) * in_row], r0 * cols, band)?;
                transpose_tiles(
                    band.as_chunks::<N>().0,
                    cols,
                    [h, cols],
                    &mut out[r0..],
                    rows,
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: element `(i, j)` goes to `(j, i)`, one at a time.
    fn naive<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
        let mut out = vec![T::default(); src.len()];
        for i in 0..rows {
            for j in 0..cols {
                out[j * rows + i] = src[i * cols + j];
            }
        }
        out
    }

    /// Shapes around the tile sizes (8 for 8-byte elements, 16 for 4-byte, 32 for 2-byte):
    /// vectors both ways, odd sizes, exact multiples and one past them.
    const SHAPES: [[usize; 2]; 12] = [
        [1, 1],
        [1, 37],
        [37, 1],
        [3, 5],
        [8, 8],
        [16, 16],
        [17, 16],
        [16, 33],
        [31, 64],
        [33, 65],
        [100, 7],
        [0, 5],
    ];

    #[test]
    fn blocked_transpose_is_the_naive_one() {
        for [rows, cols] in SHAPES {
            let src: Vec<u32> = (0..(rows * cols) as u32).collect();
            let mut dst = vec![u32::MAX; src.len()];
            transpose(&src, [rows, cols], &mut dst);
            assert_eq!(dst, naive(&src, rows, cols), "[{rows}, {cols}]");
            let src: Vec<[u8; 2]> = (0..(rows * cols) as u16).map(u16::to_le_bytes).collect();
            let mut dst = vec![[0xFF; 2]; src.len()];
            transpose(&src, [rows, cols], &mut dst);
            assert_eq!(dst, naive(&src, rows, cols), "2-byte [{rows}, {cols}]");
        }
    }

    /// bf16 bits covering NaNs, infinities, subnormals and ordinary values, or float16 bits
    /// (NaNs included, some in the last `numel % 16` elements, which torch casts apart).
    fn halves(numel: usize, seed: u16) -> Vec<u8> {
        (0..numel as u16)
            .map(|i| match (i.wrapping_mul(31) ^ seed) % 11 {
                0 => 0x7FC1,
                1 => 0xFF80,
                2 => 0x0003,
                _ => i.wrapping_mul(0x9E37) ^ seed,
            })
            .flat_map(u16::to_le_bytes)
            .collect()
    }

    /// Cast then transposed, band by band, is the whole-tensor cast transposed by the naive
    /// transpose, for every cast and width, on shapes that cut bands and tiles short.
    #[test]
    fn fused_cast_transpose_is_cast_then_naive_transpose() {
        let floats = [Dtype::F32, Dtype::F16, Dtype::BF16];
        for [rows, cols] in SHAPES {
            let numel = rows * cols;
            for from in floats {
                let src16 = halves(numel, 0x5A5A);
                let src = match from {
                    Dtype::F32 => {
                        let mut wide = vec![0u8; numel * 4];
                        cast_transposed(
                            "t",
                            &src16,
                            (Dtype::BF16, from),
                            [rows, cols],
                            false,
                            &mut wide,
                        )
                        .unwrap();
                        wide
                    }
                    _ => src16,
                };
                for to in floats {
                    let w = dtype_size(to).unwrap();
                    let mut cast = vec![0u8; numel * w];
                    cast_slice_into("t", &src, from, to, 0, numel, &mut cast).unwrap();
                    let mut ours = vec![0xEE; numel * w];
                    cast_transposed("t", &src, (from, to), [rows, cols], true, &mut ours).unwrap();
                    let expected: Vec<u8> = match w {
                        2 => naive(cast.as_chunks::<2>().0, rows, cols).concat(),
                        _ => naive(cast.as_chunks::<4>().0, rows, cols).concat(),
                    };
                    assert_eq!(ours, expected, "{from:?} -> {to:?} [{rows}, {cols}]");
                }
            }
        }
    }

    #[test]
    fn other_dtypes_are_transposed_as_they_are() {
        let (rows, cols) = (9, 20);
        let src: Vec<u8> = (0..(rows * cols) as u64)
            .flat_map(u64::to_le_bytes)
            .collect();
        let mut ours = vec![0u8; src.len()];
        let dtypes = (Dtype::I64, Dtype::I64);
        cast_transposed("t", &src, dtypes, [rows, cols], true, &mut ours).unwrap();
        assert_eq!(ours, naive(src.as_chunks::<8>().0, rows, cols).concat());
        let mut bytes = vec![0u8; rows * cols];
        let flags: Vec<u8> = (0..rows * cols).map(|i| (i % 3 == 0) as u8).collect();
        let bools = (Dtype::BOOL, Dtype::BOOL);
        cast_transposed("t", &flags, bools, [rows, cols], true, &mut bytes).unwrap();
        assert_eq!(bytes, naive(&flags, rows, cols));
    }

    #[test]
    fn wrong_lengths_and_casts_are_refused_naming_the_tensor() {
        let mut out = [0u8; 8];
        let err = cast_transposed(
            "w",
            &[0; 6],
            (Dtype::BF16, Dtype::F32),
            [2, 2],
            true,
            &mut out,
        );
        assert!(err.unwrap_err().contains("w"));
        let err = cast_transposed(
            "w",
            &[0; 16],
            (Dtype::I64, Dtype::F32),
            [2, 1],
            true,
            &mut out,
        );
        assert!(err.unwrap_err().contains("w"));
    }
}
