//! Exact numerics against an independent reference in big integers (`num-bigint`).
//!
//! The reference scales everything to integers (an `f32` times 2¹⁴⁹ is an integer), sums
//! `W + s·Σ L·R` exactly, and rounds by comparing the remainder with half a quantum — no
//! floating point, no round-to-odd, nothing shared with the kernel.

use num_bigint::{BigInt, Sign};
use num_traits::{FromPrimitive, Zero};
use safetensors::Dtype;

use super::*;
use crate::kernels::dtype::{decode_f32, encode_f32};

/// `(significand bits incl. the implicit one, minimum normal exponent, maximum exponent)`.
fn format(t: Target) -> (i64, i64, i64) {
    match t {
        Target::F32 => (24, -126, 127),
        Target::Bf16 => (8, -126, 127),
        Target::F16 => (11, -14, 15),
    }
}

fn dtype(t: Target) -> Dtype {
    match t {
        Target::F32 => Dtype::F32,
        Target::Bf16 => Dtype::BF16,
        Target::F16 => Dtype::F16,
    }
}

/// `x · 2¹⁴⁹` as an integer (exact: the scaled value is an integer below 2²⁷⁷).
fn big(x: f32) -> BigInt {
    BigInt::from_f64(f64::from(x) * 2f64.powi(149)).expect("finite")
}

/// The correctly rounded `W + s·Σ l·r` by the definition in the module docs.
fn reference(t: Target, w: f32, s: f32, l: &[f32], r: &[f32]) -> f32 {
    if w.is_infinite() {
        // A base that overflowed the target when the case was made; the factors are finite.
        return w;
    }
    let delta: BigInt = l
        .iter()
        .zip(r)
        .map(|(a, b)| big(s) * big(*a) * big(*b))
        .sum();
    if delta.is_zero() {
        return w;
    }
    round_big(t, (big(w) << 298u32) + delta) // units of 2⁻⁴⁴⁷
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Any finite f32: random sign, exponent field (subnormals included) and mantissa.
    fn any_finite(&mut self) -> f32 {
        let b = self.next() as u32;
        let field = (b >> 23) & 0xFF;
        let field = if field == 0xFF { 0xFE } else { field };
        f32::from_bits((b & 0x807F_FFFF) | (field << 23))
    }
    /// A value of magnitude up to 2^e (computed in f64, so that tiny ones become subnormals).
    fn around(&mut self, e: i32) -> f32 {
        (f64::from(self.unit()) * 2f64.powi(e)) as f32
    }
    /// [`Rng::around`] with `e` drawn from `lo..lo + span`.
    fn around_in(&mut self, lo: i32, span: usize) -> f32 {
        let e = lo + self.below(span) as i32;
        self.around(e)
    }
}

/// Rounds `v` to the target (through the crate's encoder, which the kernel does not use for
/// this) so that a base element is representable.
fn representable(t: Target, v: &[f32]) -> Vec<f32> {
    let bytes = encode_f32("w", dtype(t), v).unwrap();
    decode_f32("w", dtype(t), &bytes).unwrap()
}

/// One generated product and base: `rows × k` left, `k × n` right, `rows × n` base.
struct Case {
    t: Target,
    rows: usize,
    k: usize,
    n: usize,
    scale: f32,
    left: Vec<f32>,
    right: Vec<f32>,
    w: Vec<f32>,
}

const TARGETS: [Target; 3] = [Target::F32, Target::Bf16, Target::F16];

/// Case families: typical values, huge/tiny magnitudes and subnormals, cancellations inside
/// the sum, exact ties, exact cancellation of W, and values at the overflow threshold.
// Over 100 lines: one arm per family, read side by side; splitting them would scatter the list.
fn generate(rng: &mut Rng, family: usize) -> Case {
    let t = TARGETS[rng.below(3)];
    let (rows, k, n) = (1 + rng.below(4), 1 + rng.below(24), 1 + rng.below(80));
    let mut c = Case {
        t,
        rows,
        k,
        n,
        scale: 0.0,
        left: vec![],
        right: vec![],
        w: vec![],
    };
    let top = match t {
        Target::F16 => 10,
        _ => 60,
    };
    match family {
        // Typical: weights ~0.05, factors ~0.1, scale ~1.
        0 => {
            c.scale = 0.5 + rng.unit().abs() * 2.0;
            c.left = (0..rows * k).map(|_| rng.around(-3)).collect();
            c.right = (0..k * n).map(|_| rng.around(-3)).collect();
            c.w = (0..rows * n).map(|_| rng.around(-4)).collect();
        }
        // Any f32 at all: huge and tiny magnitudes, subnormals, overflow to ±Inf.
        1 => {
            c.scale = rng.any_finite();
            c.left = (0..rows * k).map(|_| rng.any_finite()).collect();
            c.right = (0..k * n).map(|_| rng.any_finite()).collect();
            c.w = (0..rows * n).map(|_| rng.any_finite()).collect();
        }
        // Cancellation: a big product, small ones, then the big one negated, so that the f64
        // sum loses the small ones' low bits; W tiny or opposite to the residual.
        2 => {
            c.k = 3 + rng.below(6);
            c.scale = 2f32.powi(rng.below(9) as i32 - 4);
            let big_e = rng.below(top) as i32;
            let (k, n) = (c.k, c.n);
            c.left = (0..rows * k)
                .map(|i| match i % k {
                    0 => 2f32.powi(big_e),
                    j if j == k - 1 => -(2f32.powi(big_e)),
                    _ => rng.around_in(-19, 20),
                })
                .collect();
            c.right = (0..k * n)
                .map(|i| {
                    if i / n == 0 || i / n == k - 1 {
                        1.0 + rng.unit() * 0.5
                    } else {
                        rng.around_in(-11, 12)
                    }
                })
                .collect();
            // The first and last products cancel only if their right entries agree.
            for j in 0..n {
                c.right[(k - 1) * n + j] = c.right[j];
            }
            c.w = (0..rows * n).map(|_| rng.around_in(-29, 30)).collect();
        }
        // Exact ties: W + s·(2h − h) with h half an ulp of W in the target.
        3 => {
            c.rows = 1;
            c.k = 2;
            c.scale = 2f32.powi(rng.below(5) as i32 - 2);
            let w = representable(t, &(0..n).map(|_| rng.around_in(0, 8)).collect::<Vec<_>>());
            let mut right = vec![0f32; 2 * n];
            for (j, &x) in w.iter().enumerate() {
                let (p, emin, _) = format(t);
                let e = if x == 0.0 {
                    emin
                } else {
                    (x.abs().log2().floor() as i64).max(emin)
                };
                let h = 2f64.powi((e - p) as i32) / f64::from(c.scale);
                right[j] = (2.0 * h) as f32;
                right[n + j] = (-h) as f32;
            }
            c.left = vec![1.0, 1.0];
            c.right = right;
            c.w = w;
        }
        // W cancelled exactly (result +0), or a delta of products cancelling exactly (W kept,
        // signed zeros included).
        4 => {
            c.rows = 1;
            c.k = 2;
            c.scale = 1.0;
            let w = representable(t, &(0..n).map(|_| rng.around(-2)).collect::<Vec<_>>());
            c.left = vec![1.0, 0.5];
            c.right = (0..2 * n)
                .map(|i| if i < n { -w[i] } else { 0.0 })
                .collect();
            if rng.below(2) == 0 {
                for (j, &x) in w.iter().enumerate() {
                    c.right[j] = x + 1.0;
                    c.right[n + j] = -2.0 * (x + 1.0);
                }
            }
            c.w = w
                .iter()
                .map(|&x| if rng.below(4) == 0 { -0.0 } else { x })
                .collect();
        }
        // Subnormal results and the overflow threshold of the target.
        _ => {
            let (p, emin, emax) = format(t);
            let near_max = rng.below(2) == 0;
            let e = if near_max {
                emax
            } else {
                emin - rng.below(p as usize) as i64
            };
            let w: Vec<f32> = (0..rows * n)
                .map(|_| rng.around(e as i32) * 1.999)
                .collect();
            c.w = representable(t, &w);
            c.scale = 1.0;
            // Products of the size of W's ulp; tiny ones split as 2⁻⁴⁰ · 2^(de+40).
            let de = (e - p + rng.below(3) as i64) as i32;
            let split = if near_max { 0 } else { 40 };
            c.left = (0..rows * k).map(|_| rng.around(-split)).collect();
            c.right = (0..k * n).map(|_| rng.around(de + split)).collect();
        }
    }
    c.w = representable(t, &c.w);
    c
}

/// Runs one kernel over a case; returns the rounded values and the path counts.
fn run(c: &Case, kernel: Kernel) -> (Vec<f32>, Stats) {
    let dt = dtype(c.t);
    let mut bytes = encode_f32("w", dt, &c.w).unwrap();
    let shape = [c.rows, c.n];
    let p = Product {
        left: &c.left,
        right: &c.right,
        rows: c.rows,
        k: c.k,
        n: c.n,
        scale: c.scale,
    };
    let st = merge_lowrank_with(
        "w",
        &mut BaseTensorMut::new(dt, &shape, &mut bytes),
        &p,
        false,
        kernel,
    )
    .unwrap();
    (decode_f32("w", dt, &bytes).unwrap(), st)
}

#[test]
fn every_kernel_equals_the_big_integer_reference() {
    let mut rng = Rng(0x5EED_0001);
    let mut total = Stats::default();
    let mut checked = 0usize;
    for case_no in 0..1200 {
        let c = generate(&mut rng, case_no % 6);
        let want: Vec<f32> = (0..c.rows * c.n)
            .map(|idx| {
                let (g, j) = (idx / c.n, idx % c.n);
                let col: Vec<f32> = (0..c.k).map(|kk| c.right[kk * c.n + j]).collect();
                reference(
                    c.t,
                    c.w[idx],
                    c.scale,
                    &c.left[g * c.k..(g + 1) * c.k],
                    &col,
                )
            })
            .collect();
        for kernel in [Kernel::Auto, Kernel::Portable, Kernel::ExactOnly] {
            let (got, st) = run(&c, kernel);
            for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "case {case_no} ({:?}, family {}) {kernel:?} element {idx}: got {a:e}, want {b:e} (w {:e})",
                    c.t,
                    case_no % 6,
                    c.w[idx]
                );
            }
            if kernel == Kernel::Auto {
                total.fast += st.fast;
                total.fallback += st.fallback;
                total.special += st.special;
            }
            checked += got.len();
        }
    }
    println!("{checked} elements checked; Auto kernel paths: {total:?}");
    // Both paths must really have been exercised.
    assert!(total.fast > 10_000, "{total:?}");
    assert!(total.fallback > 1_000, "{total:?}");
    assert!(total.special > 100, "{total:?}");
}

#[test]
fn rounding_an_f64_is_correct_for_each_target() {
    let mut rng = Rng(7);
    for _ in 0..20_000 {
        let x = f64::from(rng.any_finite()) * (1.0 + f64::from(rng.unit()) * 2f64.powi(-30));
        for t in TARGETS {
            // x has at most 53 bits above 2⁻²⁰¹, so x·2⁴⁴⁷ is an integer.
            let want = round_big(t, BigInt::from_f64(x * 2f64.powi(447)).unwrap());
            assert_eq!(t.round(x).to_bits(), want.to_bits(), "{t:?} {x:e}");
        }
    }
}

/// A value in units of 2⁻⁴⁴⁷ rounded to nearest-even in the target by integer arithmetic:
/// the quantum is 2^(max(e, emin) − p + 1); the remainder is compared with half of it.
fn round_big(t: Target, v: BigInt) -> f32 {
    if v.is_zero() {
        return 0.0;
    }
    let (sign, mag) = (v.sign(), v.magnitude().clone());
    let (p, emin, emax) = format(t);
    let e = mag.bits() as i64 - 1 - 447;
    let qe = e.max(emin) - (p - 1);
    let shift = (qe + 447) as u64;
    let mut n = &mag >> shift;
    let rem = &mag - (&n << shift);
    let half = num_bigint::BigUint::from(1u32) << (shift - 1);
    if rem > half || (rem == half && n.bit(0)) {
        n += 1u32;
    }
    let n: u64 = n.try_into().unwrap();
    let max = (2f64 - 2f64.powi(1 - p as i32)) * 2f64.powi(emax as i32);
    let val = n as f64 * 2f64.powi(qe as i32);
    let val = if val > max { f64::INFINITY } else { val };
    (if sign == Sign::Minus { -val } else { val }) as f32
}

#[test]
fn special_values_follow_ieee_and_are_canonical() {
    let inf = f32::INFINITY;
    // (w, scale, left, right, expected)
    type Special = (f32, f32, [f32; 2], [f32; 2], f32);
    let cases: [Special; 7] = [
        (inf, 1.0, [1.0, 1.0], [1.0, 1.0], inf),
        (1.0, 1.0, [inf, 1.0], [1.0, 1.0], inf),
        (1.0, 1.0, [inf, -inf], [1.0, 1.0], f32::NAN),
        (1.0, 1.0, [inf, 1.0], [0.0, 1.0], f32::NAN),
        (-inf, 1.0, [inf, 1.0], [1.0, 1.0], f32::NAN),
        (f32::NAN, 0.0, [1.0, 1.0], [1.0, 1.0], f32::NAN),
        (-0.0, 0.0, [1.0, 1.0], [1.0, 1.0], -0.0),
    ];
    for t in TARGETS {
        for (w, s, l, r, want) in cases {
            let c = Case {
                t,
                rows: 1,
                k: 2,
                n: 1,
                scale: s,
                left: l.to_vec(),
                right: r.to_vec(),
                w: vec![w],
            };
            for kernel in [Kernel::Auto, Kernel::Portable, Kernel::ExactOnly] {
                let (got, _) = run(&c, kernel);
                let want_bits = representable(t, &[want])[0].to_bits();
                assert_eq!(
                    got[0].to_bits(),
                    want_bits,
                    "{t:?} {kernel:?} w={w} l={l:?} r={r:?}"
                );
            }
        }
    }
}

#[test]
fn refusals_and_bad_inputs_are_errors() {
    let mut bytes = encode_f32("w", Dtype::F64, &[1.0]).unwrap();
    let p = Product {
        left: &[1.0],
        right: &[1.0],
        rows: 1,
        k: 1,
        n: 1,
        scale: 1.0,
    };
    let mut base = BaseTensorMut::new(Dtype::F64, &[1, 1], &mut bytes);
    assert!(matches!(
        merge_lowrank("w", &mut base, &p, false),
        Err(MergeMathError::Invalid { .. })
    ));
    let mut bytes = encode_f32("w", Dtype::F32, &[1.0]).unwrap();
    let mut base = BaseTensorMut::new(Dtype::F32, &[1, 1], &mut bytes);
    let inf_scale = Product {
        scale: f32::INFINITY,
        ..p
    };
    assert!(merge_lowrank("w", &mut base, &inf_scale, false).is_err());
    let msg = refusal("w", "DoRA").to_string();
    assert!(msg.contains("DoRA") && msg.contains("exact"), "{msg}");
}
