//! Finding NaN and infinite values in raw tensor bytes, without decoding them.
//!
//! A value is non-finite when its exponent bits are all ones (IEEE formats) or, for
//! `F8_E4M3` (which has no infinity), when it is the NaN pattern `S.1111.111`. Integer and
//! boolean tensors hold no such values.

use crate::tensor::Dtype;

/// How many values of `bytes` (little-endian elements of `dtype`) are NaN or infinite, and the
/// flat index of the first.
///
/// ```
/// use peftkit_checkpoint::{nonfinite, Dtype};
/// let bytes: Vec<u8> = [1.0f32, f32::NAN, 2.0, f32::INFINITY]
///     .iter()
///     .flat_map(|v| v.to_le_bytes())
///     .collect();
/// assert_eq!(nonfinite(Dtype::F32, &bytes), Some((2, 1)));
/// assert_eq!(nonfinite(Dtype::I32, &bytes), None);
/// ```
pub fn nonfinite(dtype: Dtype, bytes: &[u8]) -> Option<(usize, usize)> {
    match dtype {
        Dtype::F64 => scan::<8>(bytes, |b| {
            u64::from_le_bytes(b) & 0x7FF0_0000_0000_0000 == 0x7FF0_0000_0000_0000
        }),
        // The common float dtypes are counted a word at a time (the merge checks every merged
        // tensor, so this runs over most of a model's bytes); the scalar scan finds the first.
        Dtype::F32 => exponent_all_ones(bytes, 0x7F80_0000, 32).then(|| {
            scan::<4>(bytes, |b| {
                u32::from_le_bytes(b) & 0x7F80_0000 == 0x7F80_0000
            })
        })?,
        Dtype::BF16 => exponent_all_ones(bytes, 0x7F80, 16)
            .then(|| scan::<2>(bytes, |b| u16::from_le_bytes(b) & 0x7F80 == 0x7F80))?,
        Dtype::F16 => exponent_all_ones(bytes, 0x7C00, 16)
            .then(|| scan::<2>(bytes, |b| u16::from_le_bytes(b) & 0x7C00 == 0x7C00))?,
        Dtype::F8_E5M2 => scan::<1>(bytes, |b| b[0] & 0x7C == 0x7C),
        Dtype::F8_E4M3 => scan::<1>(bytes, |b| b[0] & 0x7F == 0x7F),
        _ => None,
    }
}

/// Whether any little-endian element of `bits` bits in `bytes` has all the bits of `mask` set
/// (`mask` never holds an element's top bit). Eight bytes at a time without a branch (SWAR):
/// per lane, `t = (w & mask) ^ mask` is zero exactly for such an element and stays below the
/// lane's top bit, so `t + low` (low = all bits under the top one) sets the top bit exactly when
/// `t` is non-zero, with no carry into the next lane. The tail is checked element by element.
fn exponent_all_ones(bytes: &[u8], mask: u64, bits: u32) -> bool {
    let lanes = 64 / bits;
    let spread = |lane: u64| (0..lanes).fold(0u64, |acc, i| acc | lane << (i * bits));
    let (mask_w, low, high) = (
        spread(mask),
        spread((1 << (bits - 1)) - 1),
        spread(1 << (bits - 1)),
    );
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let non_zero_lanes: u64 = words
        .map(|w| {
            let w = u64::from_le_bytes(<[u8; 8]>::try_from(w).unwrap_or_default());
            let t = (w & mask_w) ^ mask_w;
            u64::from((t.wrapping_add(low) & high).count_ones())
        })
        .sum();
    let words = (bytes.len() / 8) as u64;
    let lane_bytes = (bits / 8) as usize;
    non_zero_lanes < words * u64::from(lanes)
        || tail.chunks_exact(lane_bytes).any(|e| {
            let v = e.iter().rev().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
            v & mask == mask
        })
}

/// Counts the elements of size `N` that `bad` flags; the count loop has no branch on the
/// first index, so it vectorises.
fn scan<const N: usize>(bytes: &[u8], bad: impl Fn([u8; N]) -> bool) -> Option<(usize, usize)> {
    let elem = |c: &[u8]| -> [u8; N] { c.try_into().unwrap_or([0; N]) };
    let count = bytes
        .chunks_exact(N)
        .map(|c| usize::from(bad(elem(c))))
        .sum::<usize>();
    if count == 0 {
        return None;
    }
    let first = bytes.chunks_exact(N).position(|c| bad(elem(c)))?;
    Some((count, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_float_format_flags_nan_and_inf_and_nothing_else() {
        let bf16 = |v: f32| half::bf16::from_f32(v).to_bits().to_le_bytes();
        let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        let vals = [0.0, -1.5, 65504.0, 1e-8, f32::NAN, f32::NEG_INFINITY];
        let b: Vec<u8> = vals.iter().flat_map(|v| bf16(*v)).collect();
        assert_eq!(nonfinite(Dtype::BF16, &b), Some((2, 4)));
        let h: Vec<u8> = vals.iter().flat_map(|v| f16(*v)).collect();
        assert_eq!(nonfinite(Dtype::F16, &h), Some((2, 4)));
        let d: Vec<u8> = vals
            .iter()
            .flat_map(|v| f64::from(*v).to_le_bytes())
            .collect();
        assert_eq!(nonfinite(Dtype::F64, &d), Some((2, 4)));
        assert_eq!(nonfinite(Dtype::F8_E4M3, &[0x7E, 0xFF, 0x00]), Some((1, 1)));
        assert_eq!(nonfinite(Dtype::F8_E5M2, &[0x7B, 0x7C, 0xFE]), Some((2, 1)));
        assert_eq!(nonfinite(Dtype::F32, &1.0f32.to_le_bytes()), None);
    }

    /// The word-at-a-time test agrees with the element scan on every 16-bit pattern and on
    /// f32 exponent edges, at every position of a word and in the tail.
    #[test]
    fn the_word_test_agrees_with_the_element_scan() {
        for bits in 0..=u16::MAX {
            for (dtype, mask) in [(Dtype::BF16, 0x7F80u16), (Dtype::F16, 0x7C00)] {
                for (len, at) in [(4, bits as usize % 4), (7, 6), (1, 0)] {
                    let mut v = vec![0u16; len];
                    v[at] = bits;
                    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    let want = (bits & mask == mask).then_some((1, at));
                    assert_eq!(
                        nonfinite(dtype, &b),
                        want,
                        "{dtype:?} {bits:#06x} at {at}/{len}"
                    );
                }
            }
        }
        for bits in [
            0x7F80_0000u32,
            0xFF80_0001,
            0x7F7F_FFFF,
            0x0080_0000,
            0xFFC0_0000,
            0,
        ] {
            for (len, at) in [(2, 0), (2, 1), (3, 2)] {
                let mut v = vec![1.0f32.to_bits(); len];
                v[at] = bits;
                let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let want = (bits & 0x7F80_0000 == 0x7F80_0000).then_some((1, at));
                assert_eq!(
                    nonfinite(Dtype::F32, &b),
                    want,
                    "{bits:#010x} at {at}/{len}"
                );
            }
        }
    }
}
