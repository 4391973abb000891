//! The vectorised FP8 kernels against their earlier scalar definitions, kept here verbatim as
//! the reference: branchy casts, a table for e4m3 → f32, per-element NaN tests in the block
//! max-abs, the error folded serially in `f64`. Edge values: every e4m3 code, every bf16
//! pattern, ties between e4m3 neighbours, the saturation bounds, NaN payloads, subnormals;
//! blocks that are zero, hold a NaN, saturate, or have a subnormal max (an infinite scale);
//! UE8M0 and float scales; widths that are not a multiple of the lanes.

use super::*;
use crate::kernels::dtype::{decode_f32, encode_f32};
use crate::kernels::fp8_rows as rows;

/// The scalar definitions the kernels had before they were vectorised.
mod scalar {
    use super::{block_scales, nan_max, Fp8Grid, ScaleKind, E4M3_MAX};

    pub fn e4m3_to_f32(b: u8) -> f32 {
        let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
        let (exp, mant) = ((b >> 3) & 0x0f, b & 0x07);
        if exp == 0x0f && mant == 0x07 {
            return f32::NAN.copysign(sign);
        }
        let mag = if exp == 0 {
            f32::from(mant) * (2.0f32).powi(-9)
        } else {
            (1.0 + f32::from(mant) / 8.0) * (2.0f32).powi(i32::from(exp) - 7)
        };
        sign * mag
    }

    pub fn f32_to_e4m3(x: f32) -> u8 {
        const ROUNDS_PAST_MAX: u32 = 1087 << 20;
        const DENORM_MASK: u32 = 141 << 23;
        let bits = x.to_bits();
        let sign = ((bits & 0x8000_0000) >> 24) as u8;
        let mag = bits & 0x7fff_ffff;
        let result = if mag > 0x7f80_0000 {
            0x7f
        } else if mag >= ROUNDS_PAST_MAX {
            0x7e
        } else if mag < (121 << 23) {
            let sum = f32::from_bits(mag) + f32::from_bits(DENORM_MASK);
            (sum.to_bits() - DENORM_MASK) as u8
        } else {
            let odd = (mag >> 20) & 1;
            let rounded = mag
                .wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7ffff))
                .wrapping_add(odd);
            ((rounded >> 20) as u8).min(0x7e)
        };
        result | sign
    }

    fn clamp_e4m3(x: f32) -> f32 {
        if x.is_nan() {
            x
        } else {
            x.clamp(-E4M3_MAX, E4M3_MAX)
        }
    }

    pub fn dequantize(weight: &[u8], scales: &[f32], grid: &Fp8Grid) -> Vec<f32> {
        let lut: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
        let (cols, (bm, bn)) = (grid.cols, grid.block());
        let mut out = vec![0.0f32; weight.len()];
        for (i, (o, w)) in out.iter_mut().zip(weight).enumerate() {
            let (band, col) = (i / cols / bm, i % cols);
            *o = lut[usize::from(*w)] * scales[band * grid.grid_cols + col / bn];
        }
        out
    }

    /// `quantize_fp8` as it was: `(weight, inv_scales, max_abs_error)`.
    pub fn quantize(values: &[f32], grid: &Fp8Grid, kind: ScaleKind) -> (Vec<u8>, Vec<f32>, f64) {
        let lut: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
        let (cols, (bm, bn)) = (grid.cols, grid.block());
        let mut weight = vec![0u8; values.len()];
        let mut inv = vec![0.0f32; grid.scales()];
        let mut err = 0.0f64;
        let bands = weight.chunks_mut(bm * cols).zip(values.chunks(bm * cols));
        for ((out, values), inv) in bands.zip(inv.chunks_mut(grid.grid_cols)) {
            let mut max_abs = vec![0.0f32; inv.len()];
            for row in values.chunks(cols) {
                for (m, block) in max_abs.iter_mut().zip(row.chunks(bn)) {
                    *m = block
                        .iter()
                        .fold(*m, |m, v| match m.is_nan() || v.is_nan() {
                            true => f32::NAN,
                            false => m.max(v.abs()),
                        });
                }
            }
            let scales: Vec<f32> = max_abs
                .iter()
                .zip(inv.iter_mut())
                .map(|(&m, inv)| {
                    let (scale, inverse) = block_scales(m, kind);
                    *inv = inverse;
                    scale
                })
                .collect();
            for (q_row, v_row) in out.chunks_mut(cols).zip(values.chunks(cols)) {
                let blocks = q_row.chunks_mut(bn).zip(v_row.chunks(bn));
                for (((q, v), &s), &inv) in blocks.zip(&scales).zip(inv.iter()) {
                    for (q, &v) in q.iter_mut().zip(v) {
                        *q = f32_to_e4m3(clamp_e4m3(v * s));
                        let back = lut[usize::from(*q)] * inv;
                        err = nan_max(err, (f64::from(back) - f64::from(v)).abs());
                    }
                }
            }
        }
        (weight, inv, err)
    }
}

/// A small xorshift, for reproducible random bit patterns.
fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Floats on which the cast's cases meet: every bf16 pattern, every e4m3 value and the ties
/// between neighbours with their f32 neighbours, the saturation bounds, NaN payloads, f32
/// subnormals, and random bit patterns.
fn edge_floats() -> Vec<f32> {
    let mut v: Vec<f32> = (0..=u16::MAX)
        .map(|h| f32::from_bits(u32::from(h) << 16))
        .collect();
    let mut codes: Vec<f32> = (0..0x7fu8).map(scalar::e4m3_to_f32).collect();
    codes.push(480.0);
    for pair in codes.windows(2) {
        let tie = (pair[0] + pair[1]) / 2.0;
        for x in [pair[0], tie] {
            v.extend([x, x.next_up(), x.next_down()]);
        }
    }
    v.extend([
        448.0,
        464.0,
        480.0,
        f32::MAX,
        f32::INFINITY,
        f32::MIN_POSITIVE,
    ]);
    v.extend(
        [
            1,
            2,
            0x7f_ffff,
            0x7f80_0001,
            0x7fbf_ffff,
            0x7fc0_0000,
            0xffff_ffff,
        ]
        .map(f32::from_bits),
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    v.extend((0..1 << 18).map(|_| f32::from_bits(xorshift(&mut seed) as u32)));
    let negated: Vec<f32> = v.iter().map(|x| -x).collect();
    v.extend(negated);
    v
}

#[test]
fn e4m3_decoding_equals_the_scalar_definition_on_every_code() {
    for b in 0..=255u8 {
        let (got, want) = (e4m3_to_f32(b), scalar::e4m3_to_f32(b));
        assert_eq!(got.to_bits(), want.to_bits(), "code {b:#04x}");
    }
}

#[test]
fn e4m3_casting_equals_the_scalar_definition_on_edge_values() {
    for x in edge_floats() {
        assert_eq!(
            f32_to_e4m3(x),
            scalar::f32_to_e4m3(x),
            "{x:e} ({:#010x})",
            x.to_bits()
        );
    }
}

/// Weights of `rows x cols` (blocks `bm x bn`) whose blocks are, in turn: ordinary, all zero,
/// holding a NaN, holding an infinity (saturation), of subnormal max (infinite scale), ties,
/// signed zeros, random bit patterns.
fn edge_weight(lead: usize, rows: usize, cols: usize, (bm, bn): (usize, usize)) -> Vec<f32> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut w = vec![0.0f32; lead * rows * cols];
    for (i, x) in w.iter_mut().enumerate() {
        let (m, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
        let block = (m * (rows / bm) + r / bm) * (cols / bn) + c / bn;
        let noise = (xorshift(&mut seed) % 2001) as f32 / 1000.0 - 1.0;
        *x = match block % 8 {
            0 => noise,
            1 => 0.0,
            2 if (r + c) % bn == 1 => f32::NAN,
            3 if (r + c) % bn == 2 => f32::INFINITY,
            4 => noise * 1e-42,
            5 => 448.0 / 432.0 * (1 + i % 3) as f32, // 432 ties 416/448 at scale 1
            6 => [0.0, -0.0][i % 2],
            7 => f32::from_bits(xorshift(&mut seed) as u32),
            _ => noise * 100.0,
        };
    }
    w
}

/// Asserts that two quantizations are the same bits (NaN errors equal).
fn assert_same(got: (&[u8], &[f32], f64), want: &(Vec<u8>, Vec<f32>, f64), what: &str) {
    assert_eq!(got.0, &want.0[..], "{what}: weight");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(got.1), bits(&want.1), "{what}: inv scales");
    assert_eq!(got.2.to_bits(), want.2.to_bits(), "{what}: error");
}

#[test]
fn quantization_equals_the_scalar_definition_on_edge_blocks() {
    // Blocks of 4 x 5 (no whole lane), 2 x 24 (three lanes), and 16 x 40 over two experts.
    let shapes = [
        (1, 8, 20, (4, 5)),
        (1, 6, 48, (2, 24)),
        (2, 32, 80, (16, 40)),
    ];
    for (lead, rows, cols, block) in shapes {
        let w = edge_weight(lead, rows, cols, block);
        let grid = Fp8Grid::for_block(&[lead, rows, cols], Some(block)).unwrap();
        for kind in [ScaleKind::F32, ScaleKind::Ue8m0] {
            let what = format!("{lead}x{rows}x{cols} {block:?} {kind:?}");
            let want = scalar::quantize(&w, &grid, kind);
            let q = quantize_fp8(&w, &grid, kind).unwrap();
            assert_same((&q.weight, &q.inv_scales, q.max_abs_error), &want, &what);
            assert!(
                want.2.is_nan(),
                "{what}: the NaN block spreads to the error"
            );
            // From bf16 bytes, widened a row at a time: as the f32 values they decode to.
            let bf16 = encode_f32("w", Dtype::BF16, &w).unwrap();
            let want = scalar::quantize(&decode_f32("w", Dtype::BF16, &bf16).unwrap(), &grid, kind);
            let (mut out, mut inv) = (vec![0u8; w.len()], vec![0.0f32; grid.scales()]);
            let err = quantize_fp8_into(&bf16, Dtype::BF16, &grid, kind, &mut out, &mut inv);
            assert_same((&out, &inv, err.unwrap()), &want, &format!("{what} bf16"));
            // Dequantized back, in f32 and straight into bf16.
            let back = dequantize_fp8(&q.weight, &q.inv_scales, &grid).unwrap();
            let want_back = scalar::dequantize(&q.weight, &q.inv_scales, &grid);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back), bits(&want_back), "{what}: dequantized");
            let mut bf16_back = vec![0u8; w.len() * 2];
            dequantize_fp8_into(&q.weight, &q.inv_scales, &grid, Dtype::BF16, &mut bf16_back)
                .unwrap();
            let want_bf16 = encode_f32("w", Dtype::BF16, &want_back).unwrap();
            assert_eq!(bf16_back, want_bf16, "{what}: dequantized to bf16");
        }
    }
}

#[test]
fn a_finite_tensor_has_a_finite_error_and_zero_blocks_keep_unit_scales() {
    let grid = Fp8Grid::new(&[2, 16], &[1, 2]).unwrap();
    let mut w: Vec<f32> = (0..32).map(|i| (i as f32 - 7.5) / 3.0).collect();
    w[8..16].fill(0.0);
    w[24..32].fill(-0.0);
    let q = quantize_fp8(&w, &grid, ScaleKind::F32).unwrap();
    let want = scalar::quantize(&w, &grid, ScaleKind::F32);
    assert_same((&q.weight, &q.inv_scales, q.max_abs_error), &want, "finite");
    assert!(q.max_abs_error.is_finite() && q.max_abs_error > 0.0);
}

#[test]
fn the_row_kernels_give_the_same_bits_on_every_instruction_set() {
    let (cols, bn) = (80, 40);
    let w = edge_weight(1, 2, cols, (2, bn));
    let run = || {
        let mut max = rows::BlockMax::new(2);
        rows::max_abs_row(&w[..cols], bn, &mut max);
        rows::max_abs_row(&w[cols..], bn, &mut max);
        let m: Vec<u32> = max.values().map(f32::to_bits).collect();
        let (scales, invs) = ([3.5f32, f32::INFINITY], [1.0 / 3.5f32, 0.0]);
        let mut q = vec![0u8; cols];
        let mut err = rows::MaxError::default();
        rows::quantize_row(&w[..cols], &scales, &invs, bn, &mut q, &mut err);
        let mut back = vec![0.0f32; cols];
        rows::dequantize_row(&q, &invs, bn, &mut back);
        let back: Vec<u32> = back.iter().map(|x| x.to_bits()).collect();
        (m, q, err.value().to_bits(), back)
    };
    let native = run();
    let portable = rows::portable_only(run);
    assert_eq!(native, portable);
}
