//! The vectorised FP8 kernels against their earlier scalar definitions, kept here verbatim as
//! the reference: branchy casts, a table for e4m3 → f32, per-element NaN tests in the block
//! max-abs, the error folded serially (each difference rounded to `f32`, as now defined). Edge
//! values: every e4m3 code, every bf16 pattern, ties between e4m3 neighbours, the saturation
//! bounds, NaN payloads, subnormals; blocks that are zero, hold a NaN, saturate, or have a
//! subnormal max (an infinite scale); UE8M0 and float scales; widths that are not a multiple of
//! the lanes.

use super::*;
use crate::kernels::dtype::{decode_f32, encode_f32, f32_to_bf16_bits};
use crate::kernels::fp8_rows as rows;
use crate::kernels::isa::Isa;

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

    pub fn clamp_e4m3(x: f32) -> f32 {
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
                        err = nan_max(err, f64::from((back - v).abs()));
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

/// The instruction sets this CPU can run, each a path of the row kernels.
fn isas() -> Vec<Isa> {
    let all = [Isa::Portable, Isa::Avx2, Isa::Avx512];
    all.into_iter()
        .filter(|&i| i <= crate::kernels::isa::isa())
        .collect()
}

/// `values` as little-endian BF16 bytes (each value's top half: the values must be BF16).
fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
        .collect()
}

#[test]
fn the_row_kernels_give_the_same_bits_on_every_instruction_set() {
    // Blocks of 40 (no whole AVX-512 vector of BF16 maxima, a tail of 8 and 24 elements) and
    // of 128 (whole vectors only).
    for (cols, bn) in [(80, 40), (256, 128), (21, 7)] {
        let w = edge_weight(1, 2, cols, (2, bn));
        let bf16 = encode_f32("w", Dtype::BF16, &w).unwrap();
        let blocks = cols / bn;
        let run = |bf: bool| {
            let row = |r: usize| match bf {
                true => rows::Row::Bf16(&bf16[r * cols * 2..(r + 1) * cols * 2]),
                false => rows::Row::F32(&w[r * cols..(r + 1) * cols]),
            };
            let mut max = rows::BlockMax::new(blocks);
            rows::max_abs_row(row(0), bn, &mut max);
            rows::max_abs_row(row(1), bn, &mut max);
            let m: Vec<u32> = max.values().map(f32::to_bits).collect();
            let scales = [3.5f32, f32::INFINITY, 0.25][..blocks].to_vec();
            let invs = [1.0 / 3.5f32, 0.0, 4.0][..blocks].to_vec();
            let mut q = vec![0u8; cols];
            let mut err = rows::MaxError::default();
            rows::quantize_row(row(0), &scales, &invs, bn, &mut q, &mut err);
            let mut back = vec![0.0f32; cols];
            rows::dequantize_row(&q, &invs, bn, &mut back);
            let back: Vec<u32> = back.iter().map(|x| x.to_bits()).collect();
            let mut back16 = vec![0u8; cols * 2];
            rows::dequantize_row_bf16(&q, &invs, bn, &mut back16);
            (m, q, err.value().to_bits(), back, back16)
        };
        let want = rows::portable_only(|| run(false));
        for isa in isas() {
            for bf in [false, true] {
                let got = rows::with_isa(isa, || run(bf));
                if bf {
                    // The BF16 row is the f32 one rounded: compare with the baseline on it.
                    let w16 = decode_f32("w", Dtype::BF16, &bf16).unwrap();
                    let mut max = rows::BlockMax::new(blocks);
                    rows::portable_only(|| {
                        rows::max_abs_row(rows::Row::F32(&w16[..cols]), bn, &mut max);
                        rows::max_abs_row(rows::Row::F32(&w16[cols..]), bn, &mut max);
                    });
                    let m: Vec<u32> = max.values().map(f32::to_bits).collect();
                    assert_eq!(got.0, m, "{isa:?} bf16 {cols}/{bn}: block maxima");
                    continue;
                }
                assert_eq!(got, want, "{isa:?} {cols}/{bn}");
            }
        }
    }
}

/// The scalar definition of one row's quantization: bytes and error.
fn scalar_row(v: &[f32], scales: &[f32], invs: &[f32], bn: usize) -> (Vec<u8>, f64) {
    let mut err = 0.0f64;
    let mut q = vec![0u8; v.len()];
    let blocks = q.chunks_mut(bn).zip(v.chunks(bn)).zip(scales).zip(invs);
    for (((q, v), &s), &inv) in blocks {
        for (q, &v) in q.iter_mut().zip(v) {
            *q = scalar::f32_to_e4m3(scalar::clamp_e4m3(v * s));
            let back = scalar::e4m3_to_f32(*q) * inv;
            err = nan_max(err, f64::from((back - v).abs()));
        }
    }
    (q, err)
}

#[test]
fn every_path_casts_edge_values_and_every_bf16_pattern_as_the_scalar_definition() {
    // Scales that leave values as they are, shrink them into the subnormals, blow them past
    // 448, or are the infinite / zero ones of degenerate blocks; pairs that are not inverses,
    // a zero scale with a finite inverse (infinity times it is a NaN code), and inverses on
    // each side of 2^8, where the kernels' one multiply by `inv · 2^120` stops being finite.
    let bn = 128;
    let scale_sets: [(f32, f32); 9] = [
        (1.0, 1.0),
        (448.0 / 3.0, 3.0 / 448.0),
        (2f32.powi(-20), 2f32.powi(20)),
        (f32::INFINITY, 0.0),
        (0.0, f32::INFINITY),
        (0.0, 1.0),
        (3.0, 0.5),
        (1.0 / 255.9, 255.9),
        (1.0 / 256.0, 256.0),
    ];
    let mut all = edge_floats();
    all.resize(all.len().div_ceil(bn) * bn, 0.0);
    let bf16_all: Vec<f32> = (0..=u16::MAX)
        .map(|h| f32::from_bits(u32::from(h) << 16))
        .collect();
    let finite: Vec<f32> = all.iter().copied().filter(|x| !x.is_nan()).collect();
    let mut finite = finite;
    finite.truncate(finite.len() / bn * bn);
    for (s, inv) in scale_sets {
        for (what, v) in [("edge", &all), ("no NaN", &finite), ("bf16", &bf16_all)] {
            let blocks = v.len() / bn;
            let (scales, invs) = (vec![s; blocks], vec![inv; blocks]);
            let want = scalar_row(v, &scales, &invs, bn);
            for isa in isas() {
                let run = |row: rows::Row<'_>| {
                    let mut q = vec![0u8; v.len()];
                    let mut err = rows::MaxError::default();
                    rows::quantize_row(row, &scales, &invs, bn, &mut q, &mut err);
                    (q, err.value())
                };
                let got = rows::with_isa(isa, || run(rows::Row::F32(v)));
                let at = format!("{isa:?} {what} scale {s}");
                assert!(got.0 == want.0, "{at}: bytes");
                assert_eq!(got.1.to_bits(), want.1.to_bits(), "{at}: error {}", got.1);
                if what == "bf16" {
                    let bytes = bf16_bytes(v);
                    let got = rows::with_isa(isa, || run(rows::Row::Bf16(&bytes)));
                    assert!(got.0 == want.0, "{at}: bytes from BF16");
                    assert_eq!(got.1.to_bits(), want.1.to_bits(), "{at}: error from BF16");
                }
            }
        }
    }
}

/// Rows of an ordinary block (finite, inside the range, both signs): an error taken from a
/// wrong sign or value is not hidden behind the infinite errors of the edge rows above.
#[test]
fn every_path_measures_an_ordinary_rows_error_as_the_scalar_definition() {
    // Scattered values (no two errors alike), and their negations: one of the two rows has
    // its largest error below zero.
    let mut state = 0x2545_f491u32;
    let scattered: Vec<f32> = (0..4 * 128)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            bf16_round((state >> 8) as f32 / (1 << 24) as f32 * 150.0 - 60.0)
        })
        .collect();
    for sign in [1.0f32, -1.0] {
        let bn = 128;
        let v: Vec<f32> = scattered.iter().map(|x| sign * x).collect();
        ordinary_row_error_as_the_scalar_definition(&v, bn);
    }
}

fn ordinary_row_error_as_the_scalar_definition(v: &[f32], bn: usize) {
    let m = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let (scales, invs) = (vec![448.0 / m; 4], vec![m / 448.0; 4]);
    let want = scalar_row(v, &scales, &invs, bn);
    assert!(
        want.1 > 0.0 && want.1 < f64::from(m) / 8.0,
        "an ordinary error: {}",
        want.1
    );
    let bytes = bf16_bytes(v);
    for isa in isas() {
        for row in [rows::Row::F32(v), rows::Row::Bf16(&bytes)] {
            let mut q = vec![0u8; v.len()];
            let mut err = rows::MaxError::default();
            rows::with_isa(isa, || {
                rows::quantize_row(row, &scales, &invs, bn, &mut q, &mut err)
            });
            assert!(q == want.0, "{isa:?}: bytes");
            assert_eq!(err.value().to_bits(), want.1.to_bits(), "{isa:?}: error");
        }
    }
}

/// `x` rounded to the nearest BF16 (ties away from zero: any BF16 will do).
fn bf16_round(x: f32) -> f32 {
    f32::from_bits((x.to_bits() + 0x8000) & 0xffff_0000)
}

#[test]
fn every_path_dequantizes_every_code_to_bf16_as_the_scalar_definition() {
    // All 256 codes in blocks of 16 (two AVX2 vectors, one AVX-512), and in blocks of 9 (tails).
    let codes: Vec<u8> = (0..=255u8).collect();
    let scales = [
        1.0f32,
        3.0 / 448.0,
        2f32.powi(-130),
        -0.75,
        // Below and at 2^8, where the kernels' one multiply by `s · 2^120` stops being finite.
        255.99,
        256.0,
        1e30,
        f32::INFINITY,
        0.0,
        f32::NAN,
    ];
    for bn in [16, 32, 9] {
        let w: Vec<u8> = codes
            .iter()
            .cycle()
            .take(256 / bn * bn * scales.len())
            .copied()
            .collect();
        let s: Vec<f32> = scales.iter().cycle().take(w.len() / bn).copied().collect();
        let want: Vec<u8> = w
            .iter()
            .enumerate()
            .flat_map(|(i, &q)| {
                let x = scalar::e4m3_to_f32(q) * s[i / bn];
                f32_to_bf16_bits(x).to_le_bytes()
            })
            .collect();
        for isa in isas() {
            let mut got = vec![0u8; w.len() * 2];
            rows::with_isa(isa, || rows::dequantize_row_bf16(&w, &s, bn, &mut got));
            assert!(got == want, "{isa:?} blocks of {bn}");
        }
    }
}

#[test]
fn whole_quantizations_agree_on_every_instruction_set() {
    let (lead, r, c, block) = (2, 32, 80, (16, 40));
    let w = edge_weight(lead, r, c, block);
    let grid = Fp8Grid::for_block(&[lead, r, c], Some(block)).unwrap();
    let bf16 = encode_f32("w", Dtype::BF16, &w).unwrap();
    for kind in [ScaleKind::F32, ScaleKind::Ue8m0] {
        let want = scalar::quantize(&decode_f32("w", Dtype::BF16, &bf16).unwrap(), &grid, kind);
        for isa in isas() {
            let (mut out, mut inv) = (vec![0u8; w.len()], vec![0.0f32; grid.scales()]);
            let err = rows::with_isa(isa, || {
                quantize_fp8_into(&bf16, Dtype::BF16, &grid, kind, &mut out, &mut inv)
            });
            assert_same(
                (&out, &inv, err.unwrap()),
                &want,
                &format!("{isa:?} {kind:?}"),
            );
            let mut back = vec![0u8; w.len() * 2];
            rows::with_isa(isa, || {
                dequantize_fp8_into(&out, &inv, &grid, Dtype::BF16, &mut back).unwrap()
            });
            let want_back = scalar::dequantize(&out, &inv, &grid);
            assert!(back == encode_f32("w", Dtype::BF16, &want_back).unwrap());
        }
    }
}
