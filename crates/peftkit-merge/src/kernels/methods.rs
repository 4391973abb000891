//! Merge kernels of other PEFT methods (docs/formats.md, "Merge numerics"): IA³, LoHa, LoKr, trainable tokens,
//! and a generic "add this delta" kernel.
//!
//! LoHa and LoKr go through peft's LyCORIS base class, whose merge is `W += Δ` with Δ in f32
//! and **one** rounding for both the safe and the unsafe path (safe only adds the finiteness
//! check), and whose unmerge is `W -= Δ`, again without rounding Δ first.

use super::apply::{update_rows, with_kept, BaseTensorMut, F32Tensor, Rows};
use super::dtype::{element_size, encode_f32_into, round_slice_to};
use super::error::{check_len, check_rank, numel, MergeMathError, Result};
use super::exact::{refusal, Numerics, Target};
use super::gemm::{lowrank_product, product_rows};
use super::lora::MergeOptions;
use super::order::active_k_blocks;

/// Adds (or with `opts.unmerge` subtracts) an already computed f32 delta, laid out like the
/// base tensor, in place.
///
/// Δ is rounded to the base dtype first when `opts.round_delta_first` is set (peft's embedding,
/// MHA and expert paths, unmerge); `opts.safe_merge` adds the finiteness check *only* — callers
/// that need peft's LoRA safe-merge rounding set `round_delta_first` too.
///
/// Refused with exact numerics: a precomputed f32 delta has been rounded already.
pub fn add_delta(mut base: BaseTensorMut<'_>, delta: &[f32], opts: &MergeOptions) -> Result<()> {
    if opts.numerics == Numerics::Exact {
        return Err(refusal("base weight", "a precomputed delta"));
    }
    base.validate("base weight", true)?;
    check_len("delta", base.shape, delta.len())?;
    let row_len = base.shape.last().copied().unwrap_or(1).max(1);
    add_delta_rows(&mut base, row_len, opts, |first_row, out| {
        let start = first_row * row_len;
        out.copy_from_slice(&delta[start..start + out.len()]);
        Ok(())
    })
}

/// [`add_delta`] of a delta made a block of rows at a time: `delta(first_row, out)` fills
/// `out` with its rows `first_row..` (rows of `row_len`), so the whole delta is never held.
fn add_delta_rows(
    base: &mut BaseTensorMut<'_>,
    row_len: usize,
    opts: &MergeOptions,
    delta: impl Fn(usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let dtype = base.dtype;
    let round_first = opts.round_delta_first;
    let sub = opts.unmerge;
    let check = opts.checks_result();
    update_rows(
        "base weight",
        base,
        row_len,
        check,
        |first_row, rows, scratch| {
            let n = match &rows {
                Rows::F32(w) => w.len(),
                Rows::F64(w) => w.len(),
            };
            scratch.resize(n, 0.0);
            let d = &mut scratch[..n];
            delta(first_row, d)?;
            match rows {
                Rows::F32(w) => {
                    if round_first {
                        round_slice_to(dtype, d)?;
                    }
                    if sub {
                        w.iter_mut().zip(&*d).for_each(|(x, y)| *x -= *y);
                    } else {
                        w.iter_mut().zip(&*d).for_each(|(x, y)| *x += *y);
                    }
                }
                Rows::F64(w) => {
                    if sub {
                        w.iter_mut().zip(&*d).for_each(|(x, y)| *x -= f64::from(*y));
                    } else {
                        w.iter_mut().zip(&*d).for_each(|(x, y)| *x += f64::from(*y));
                    }
                }
            }
            Ok(())
        },
    )
}

/// Merges an IA³ vector into a weight in place: `W' = fl_dtype(f32(W) · l)` broadcast along
/// one axis (unmerge: `W / (l + 1e-8)`).
///
/// * Linear `(out, in)`: `ia3_l` is `(out, 1)` (scales rows) or, for feed-forward modules,
///   `(1, in)` (scales columns). With `fan_in_fan_out` the weight is `(in, out)` and the
///   roles swap, as peft transposes `ia3_l`.
/// * Conv `(out, in/groups, *k)`: `ia3_l` is `(1, out, 1, …)` (scales output channels) or,
///   feed-forward, `(1, in, 1, …)` (scales input channels; with `groups > 1` input channel
///   `g·(in/groups) + j` of group `g`).
///
/// Base dtypes F32/BF16/F16/F64.
pub fn merge_ia3_weight(
    mut base: BaseTensorMut<'_>,
    ia3_l: F32Tensor<'_>,
    feedforward: bool,
    fan_in_fan_out: bool,
    groups: usize,
    opts: &MergeOptions,
) -> Result<()> {
    const WHAT: &str = "IA3 weight";
    base.validate(WHAT, true)?;
    ia3_l.validate("ia3_l")?;
    check_rank("base weight", base.shape, 2, 5, "2 to 5")?;
    let shape = base.shape.to_vec();
    let (rows, cols) = (shape[0], numel(WHAT, &shape[1..])?);
    let (axis, expected) = Ia3Axis::of(&shape, rows, feedforward, fan_in_fan_out, groups)?;
    if ia3_l.shape != expected.as_slice() {
        return Err(MergeMathError::ShapeMismatch {
            what: "ia3_l",
            expected,
            got: ia3_l.shape.to_vec(),
        });
    }
    let l = ia3_l.data;
    // peft adds the Python float 1e-8 to the f32 vector before dividing on unmerge.
    let divisor: Vec<f32> = l.iter().map(|x| x + 1e-8f32).collect();
    let unmerge = opts.unmerge;
    let exact = ia3_exact_target(WHAT, base.dtype, opts)?;
    let factor_of = |row: usize, col: usize| axis.factor(row, col);
    update_rows(
        WHAT,
        &mut base,
        cols.max(1),
        opts.checks_result(),
        |first_row, rows, _| {
            match rows {
                Rows::F32(w) => {
                    for (q, wr) in w.chunks_exact_mut(cols.max(1)).enumerate() {
                        for (c, x) in wr.iter_mut().enumerate() {
                            let i = factor_of(first_row + q, c);
                            if let Some(t) = exact {
                                *x = t.product(*x, l[i]);
                            } else if unmerge {
                                *x /= divisor[i];
                            } else {
                                *x *= l[i];
                            }
                        }
                    }
                }
                Rows::F64(w) => {
                    for (q, wr) in w.chunks_exact_mut(cols.max(1)).enumerate() {
                        for (c, x) in wr.iter_mut().enumerate() {
                            let i = factor_of(first_row + q, c);
                            if unmerge {
                                *x /= f64::from(divisor[i]);
                            } else {
                                *x *= f64::from(l[i]);
                            }
                        }
                    }
                }
            }
            Ok(())
        },
    )
}

/// Which entry of `ia3_l` scales element `(row, col)` of a weight viewed as `(out, rest)`.
#[derive(Clone, Copy)]
enum Ia3Axis {
    /// Output features: one factor per row.
    Rows,
    /// Input features: one factor per input channel of `kernel` columns.
    Cols { kernel: usize },
    /// Input channels of a grouped convolution: `opg` output and `ipg` input channels per
    /// group.
    GroupedCols {
        kernel: usize,
        opg: usize,
        ipg: usize,
    },
}

impl Ia3Axis {
    /// The axis `ia3_l` scales in a weight of `shape` (`rows` output features), and the
    /// shape `ia3_l` must have, as peft lays it out.
    fn of(
        shape: &[usize],
        rows: usize,
        feedforward: bool,
        fan_in_fan_out: bool,
        groups: usize,
    ) -> Result<(Self, Vec<usize>)> {
        let cols = numel("IA3 weight", &shape[1..])?;
        let kernel = numel("IA3 weight", shape.get(2..).unwrap_or(&[]))?;
        if shape.len() == 2 {
            return Ok(match (feedforward, fan_in_fan_out) {
                (false, false) => (Ia3Axis::Rows, vec![rows, 1]),
                (true, false) => (Ia3Axis::Cols { kernel: 1 }, vec![1, cols]),
                (false, true) => (Ia3Axis::Cols { kernel: 1 }, vec![cols, 1]),
                (true, true) => (Ia3Axis::Rows, vec![1, rows]),
            });
        }
        if groups == 0 || !rows.is_multiple_of(groups) {
            return Err(MergeMathError::Invalid {
                what: "conv groups",
                reason: format!("{groups} groups do not divide {rows} output channels"),
            });
        }
        let ipg = shape[1];
        let mut exp = if feedforward {
            vec![1, ipg * groups]
        } else {
            vec![1, rows]
        };
        exp.resize(shape.len(), 1);
        let axis = match (feedforward, groups) {
            (false, _) => Ia3Axis::Rows,
            (true, 1) => Ia3Axis::Cols { kernel },
            (true, g) => Ia3Axis::GroupedCols {
                kernel,
                opg: rows / g,
                ipg,
            },
        };
        Ok((axis, exp))
    }

    /// The index into `ia3_l` of element `(row, col)`.
    fn factor(self, row: usize, col: usize) -> usize {
        match self {
            Ia3Axis::Rows => row,
            Ia3Axis::Cols { kernel } => col / kernel,
            Ia3Axis::GroupedCols { kernel, opg, ipg } => (row / opg) * ipg + col / kernel,
        }
    }
}

/// Merges an IA³ vector into the bias of a non-feed-forward layer in place:
/// `b' = fl_dtype(b · l)` (peft leaves feed-forward biases alone; do not call it for them).
pub fn merge_ia3_bias(
    mut bias: BaseTensorMut<'_>,
    ia3_l: F32Tensor<'_>,
    opts: &MergeOptions,
) -> Result<()> {
    const WHAT: &str = "IA3 bias";
    let n = bias.validate(WHAT, true)?;
    ia3_l.validate("ia3_l")?;
    if ia3_l.data.len() != n {
        return Err(MergeMathError::ShapeMismatch {
            what: "ia3_l",
            expected: bias.shape.to_vec(),
            got: ia3_l.shape.to_vec(),
        });
    }
    let l = ia3_l.data;
    let unmerge = opts.unmerge;
    let exact = ia3_exact_target(WHAT, bias.dtype, opts)?;
    update_rows(
        WHAT,
        &mut bias,
        n.max(1),
        opts.checks_result(),
        |_, rows, _| {
            match rows {
                Rows::F32(w) => w.iter_mut().zip(l).for_each(|(x, f)| {
                    if let Some(t) = exact {
                        *x = t.product(*x, *f)
                    } else if unmerge {
                        *x /= f + 1e-8f32
                    } else {
                        *x *= *f
                    }
                }),
                Rows::F64(w) => w.iter_mut().zip(l).for_each(|(x, f)| {
                    if unmerge {
                        *x /= f64::from(f + 1e-8f32)
                    } else {
                        *x *= f64::from(*f)
                    }
                }),
            }
            Ok(())
        },
    )
}

/// With exact numerics, the dtype an IA³ product is rounded to (`W' = round(W · l)`, one
/// correct rounding); the unmerge division is refused there.
fn ia3_exact_target(
    what: &'static str,
    dtype: safetensors::Dtype,
    opts: &MergeOptions,
) -> Result<Option<Target>> {
    match opts.numerics {
        Numerics::Peft => Ok(None),
        Numerics::Exact if opts.unmerge => Err(refusal(what, "IA3 unmerge")),
        Numerics::Exact => Target::of(what, dtype).map(Some),
    }
}

/// Checks a 2-D factor and returns its `(rows, cols)`.
fn dims2(what: &'static str, t: &F32Tensor<'_>) -> Result<(usize, usize)> {
    t.validate(what)?;
    check_rank(what, t.shape, 2, 2, "2")?;
    Ok((t.shape[0], t.shape[1]))
}

/// The shape `(m, n)` of `a @ b` for two 2-D factors, checked.
fn product_dims(
    an: &'static str,
    a: &F32Tensor<'_>,
    bn: &'static str,
    b: &F32Tensor<'_>,
) -> Result<(usize, usize)> {
    let (m, k) = dims2(an, a)?;
    let (k2, n) = dims2(bn, b)?;
    if k != k2 {
        return Err(MergeMathError::ShapeMismatch {
            what: bn,
            expected: vec![k, n],
            got: b.shape.to_vec(),
        });
    }
    Ok((m, n))
}

/// `a @ b` for two 2-D factors, in torch's f32 order.
fn matmul(
    an: &'static str,
    a: &F32Tensor<'_>,
    bn: &'static str,
    b: &F32Tensor<'_>,
) -> Result<(usize, usize, Vec<f32>)> {
    let (m, n) = product_dims(an, a, bn, b)?;
    Ok((
        m,
        n,
        lowrank_product(a.data, b.data, m, a.shape[1], n, 1.0)?,
    ))
}

/// LoHa delta (non-CP form): `Δ = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) · s`, reshaped to
/// `base_shape` (Linear `(out, in)`, Conv flattened `(out, in·k·k)`).
///
/// `scale` is `f32(alpha / r)`; the Tucker/CP variant (`hada_t1`/`hada_t2`) is not supported.
pub fn loha_delta(
    base_shape: &[usize],
    w1a: F32Tensor<'_>,
    w1b: F32Tensor<'_>,
    w2a: F32Tensor<'_>,
    w2b: F32Tensor<'_>,
    scale: f32,
) -> Result<Vec<f32>> {
    let loha = LohaRows::new(base_shape, (w1a, w1b), (w2a, w2b), scale)?;
    let mut out = vec![0f32; base_shape.first().copied().unwrap_or(0) * loha.n];
    loha.rows(0, &mut out);
    Ok(out)
}

/// A LoHa delta, checked against its base, made a block of output rows at a time: a row of
/// each product is its left factor's row times the right factor (reduced over the rank in
/// torch's order, as the whole product is), so a block of rows holds the whole delta's bits.
struct LohaRows<'a> {
    w1: (F32Tensor<'a>, F32Tensor<'a>),
    w2: (F32Tensor<'a>, F32Tensor<'a>),
    /// Columns of the delta (of the base viewed as `out × n`).
    n: usize,
    /// Each product's reduction blocks over its rank (torch's order).
    blocks: [Vec<std::ops::Range<usize>>; 2],
    scale: f32,
}

thread_local! {
    /// The second product's rows of a block ([`LohaRows::rows`]), kept per thread.
    static HADA_W2: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl<'a> LohaRows<'a> {
    fn new(
        base_shape: &[usize],
        w1: (F32Tensor<'a>, F32Tensor<'a>),
        w2: (F32Tensor<'a>, F32Tensor<'a>),
        scale: f32,
    ) -> Result<Self> {
        let (m1, n1) = product_dims("hada_w1_a", &w1.0, "hada_w1_b", &w1.1)?;
        let (m2, n2) = product_dims("hada_w2_a", &w2.0, "hada_w2_b", &w2.1)?;
        if (m1, n1) != (m2, n2) {
            return Err(MergeMathError::ShapeMismatch {
                what: "hada_w2_a @ hada_w2_b",
                expected: vec![m1, n1],
                got: vec![m2, n2],
            });
        }
        let total = m1.checked_mul(n1).ok_or(MergeMathError::Overflow {
            what: "LoHa delta",
            shape: vec![m1, n1],
        })?;
        check_len(
            "LoHa delta (reshaped to the base weight)",
            base_shape,
            total,
        )?;
        if base_shape.first() != Some(&m1) {
            return Err(MergeMathError::ShapeMismatch {
                what: "base weight",
                expected: vec![m1, n1],
                got: base_shape.to_vec(),
            });
        }
        let blocks = [
            active_k_blocks(w1.0.shape[1]),
            active_k_blocks(w2.0.shape[1]),
        ];
        Ok(LohaRows {
            w1,
            w2,
            n: n1,
            blocks,
            scale,
        })
    }

    /// Fills `out` with delta rows `first_row..`: `fl(fl(p1 · p2) · s)` per element.
    fn rows(&self, first_row: usize, out: &mut [f32]) {
        let rows = out.len().checked_div(self.n).unwrap_or(0);
        let product = |(a, b): (F32Tensor<'_>, F32Tensor<'_>), blocks, out: &mut [f32]| {
            let k = a.shape[1];
            let left = &a.data[first_row * k..(first_row + rows) * k];
            product_rows(left, b.data, k, self.n, blocks, 1.0, out);
        };
        product(self.w1, &self.blocks[0], out);
        with_kept(&HADA_W2, |p2| {
            p2.resize(out.len(), 0.0);
            product(self.w2, &self.blocks[1], p2);
            for (x, y) in out.iter_mut().zip(p2.iter()) {
                *x = (*x * y) * self.scale;
            }
        });
    }
}

/// Merges a LoHa adapter (non-CP) in place, a block of rows at a time; see [`loha_delta`] and
/// the module docs.
pub fn merge_loha(
    mut base: BaseTensorMut<'_>,
    w1a: F32Tensor<'_>,
    w1b: F32Tensor<'_>,
    w2a: F32Tensor<'_>,
    w2b: F32Tensor<'_>,
    scale: f32,
    opts: &MergeOptions,
) -> Result<()> {
    if opts.numerics == Numerics::Exact {
        return Err(refusal("LoHa weight", "LoHa"));
    }
    base.validate("base weight", true)?;
    let loha = LohaRows::new(base.shape, (w1a, w1b), (w2a, w2b), scale)?;
    add_delta_rows(&mut base, loha.n, &lycoris_opts(opts), |first_row, out| {
        loha.rows(first_row, out);
        Ok(())
    })
}

/// The LyCORIS merge never rounds Δ first.
fn lycoris_opts(opts: &MergeOptions) -> MergeOptions {
    MergeOptions {
        round_delta_first: false,
        ..*opts
    }
}

/// One Kronecker factor of a LoKr adapter.
#[derive(Debug, Clone, Copy)]
pub enum LokrFactor<'a> {
    /// A full matrix (`lokr_w1` / `lokr_w2`): 2-D, or 4-D `(c, d, kh, kw)` for conv `w2`.
    Full(F32Tensor<'a>),
    /// A low-rank pair (`lokr_w1_a`, `lokr_w1_b`), multiplied in torch's f32 order.
    Product(F32Tensor<'a>, F32Tensor<'a>),
}

impl LokrFactor<'_> {
    /// Materialises the factor: `(shape, values)`.
    fn build(&self, a_name: &'static str, b_name: &'static str) -> Result<(Vec<usize>, Vec<f32>)> {
        match self {
            LokrFactor::Full(t) => {
                t.validate(a_name)?;
                check_rank(a_name, t.shape, 2, 5, "2 to 5")?;
                Ok((t.shape.to_vec(), t.data.to_vec()))
            }
            LokrFactor::Product(a, b) => {
                let (m, n, p) = matmul(a_name, a, b_name, b)?;
                Ok((vec![m, n], p))
            }
        }
    }
}

/// LoKr delta: `Δ = kron(w1, w2) · s`, reshaped to `base_shape`.
///
/// `w1` is 2-D `(a, b)`; `w2` is `(c, d)` or `(c, d, *kernel)`; the product has shape
/// `(a·c, b·d, *kernel)` with `Δ[i·c+k, j·d+l, …] = fl32(fl32(w1[i,j] · w2[k,l,…]) · s)`.
/// `scale` is `f32(alpha / r)`; the CP form (`lokr_t2`) is not supported.
pub fn lokr_delta(
    base_shape: &[usize],
    w1: LokrFactor<'_>,
    w2: LokrFactor<'_>,
    scale: f32,
) -> Result<Vec<f32>> {
    let lokr = LokrRows::new(base_shape, w1, w2, scale)?;
    let mut out = vec![0f32; lokr.rows * lokr.row_len];
    lokr.rows(0, &mut out);
    Ok(out)
}

/// A LoKr delta, checked against its base, made a block of rows at a time: row `i·c + k` of
/// `kron(w1, w2)` is row `i` of `w1` times row `k` of `w2`, so only the two factors are held.
struct LokrRows {
    /// `w1`, `(a, b)`.
    w1: Vec<f32>,
    b: usize,
    /// `w2`, `(c, d·kernel)`.
    w2: Vec<f32>,
    c: usize,
    /// Rows (`a·c`) and row length (`b·d·kernel`) of the delta.
    rows: usize,
    row_len: usize,
    scale: f32,
}

impl LokrRows {
    fn new(
        base_shape: &[usize],
        w1: LokrFactor<'_>,
        w2: LokrFactor<'_>,
        scale: f32,
    ) -> Result<Self> {
        let (s1, v1) = w1.build("lokr_w1", "lokr_w1_b")?;
        let (s2, v2) = w2.build("lokr_w2", "lokr_w2_b")?;
        if s1.len() != 2 {
            return Err(MergeMathError::Rank {
                what: "lokr_w1",
                expected: "2",
                got: s1,
            });
        }
        let (a, b) = (s1[0], s1[1]);
        let (c, d) = (s2[0], s2[1]);
        let kernel = numel("lokr_w2", &s2[2..])?;
        let mut out_shape = vec![a * c, b * d];
        out_shape.extend_from_slice(&s2[2..]);
        let total = numel("LoKr delta", &out_shape)?;
        check_len(
            "LoKr delta (reshaped to the base weight)",
            base_shape,
            total,
        )?;
        Ok(LokrRows {
            w1: v1,
            b,
            w2: v2,
            c,
            rows: a * c,
            row_len: b * d * kernel,
            scale,
        })
    }

    /// Fills `out` with delta rows `first_row..`: `fl(fl(w1[i, j] · w2[k, l…]) · s)`.
    fn rows(&self, first_row: usize, out: &mut [f32]) {
        let dk = self.row_len.checked_div(self.b).unwrap_or(0);
        for (g, orow) in (first_row..).zip(out.chunks_exact_mut(self.row_len.max(1))) {
            let (i, k) = (g / self.c, g % self.c);
            let src = &self.w2[k * dk..(k + 1) * dk];
            for (x, dst) in self.w1[i * self.b..(i + 1) * self.b]
                .iter()
                .zip(orow.chunks_exact_mut(dk.max(1)))
            {
                for (o, y) in dst.iter_mut().zip(src) {
                    *o = (x * y) * self.scale;
                }
            }
        }
    }
}

/// Merges a LoKr adapter in place, a block of rows at a time; see [`lokr_delta`] and the
/// module docs.
pub fn merge_lokr(
    mut base: BaseTensorMut<'_>,
    w1: LokrFactor<'_>,
    w2: LokrFactor<'_>,
    scale: f32,
    opts: &MergeOptions,
) -> Result<()> {
    if opts.numerics == Numerics::Exact {
        return Err(refusal("LoKr weight", "LoKr"));
    }
    base.validate("base weight", true)?;
    let lokr = LokrRows::new(base.shape, w1, w2, scale)?;
    add_delta_rows(
        &mut base,
        lokr.row_len,
        &lycoris_opts(opts),
        |first_row, out| {
            lokr.rows(first_row, out);
            Ok(())
        },
    )
}

/// Trainable tokens: replaces rows `indices[j]` of an embedding-like weight `(vocab, dim)` by
/// `rows[j]` rounded to the base dtype (`W.index_copy(0, indices, rows.to(W))`).
///
/// With repeated indices the last row wins. Base dtypes F32/BF16/F16/F64.
pub fn replace_rows(base: BaseTensorMut<'_>, indices: &[usize], rows: F32Tensor<'_>) -> Result<()> {
    const WHAT: &str = "embedding (trainable tokens)";
    base.validate(WHAT, true)?;
    rows.validate("trainable_tokens_delta")?;
    check_rank(WHAT, base.shape, 2, 2, "2")?;
    let (vocab, dim) = (base.shape[0], base.shape[1]);
    if rows.shape != [indices.len(), dim] {
        return Err(MergeMathError::ShapeMismatch {
            what: "trainable_tokens_delta",
            expected: vec![indices.len(), dim],
            got: rows.shape.to_vec(),
        });
    }
    if let Some(&bad) = indices.iter().find(|&&i| i >= vocab) {
        return Err(MergeMathError::Invalid {
            what: "trainable token index",
            reason: format!("index {bad} is outside the vocabulary of {vocab}"),
        });
    }
    let size = element_size(base.dtype)?;
    let row_bytes = dim * size;
    for (j, &idx) in indices.iter().enumerate() {
        let dst = &mut base.data[idx * row_bytes..(idx + 1) * row_bytes];
        encode_f32_into(WHAT, base.dtype, &rows.data[j * dim..(j + 1) * dim], dst)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dtype::{decode_f32, encode_f32};
    use safetensors::Dtype;

    /// LoKr merged a block of rows at a time (three blocks) gives the bits of its whole delta
    /// added, and that delta is `kron(w1, w2) · s` element by element.
    #[test]
    fn lokr_by_blocks_of_rows_is_the_whole_delta_added() {
        let vals = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k) % 211) as f32 / 53.0 - 2.0)
                .collect()
        };
        let ((a, b), (c, d)) = ((4, 8), (150, 128));
        let (v1, v2) = (vals(a * b, 3), vals(c * d, 5));
        let (s1, s2) = ([a, b], [c, d]);
        let w1 = LokrFactor::Full(F32Tensor::new(&s1, &v1));
        let w2 = LokrFactor::Full(F32Tensor::new(&s2, &v2));
        let shape = [a * c, b * d];
        let delta = lokr_delta(&shape, w1, w2, 0.5).unwrap();
        let opts = MergeOptions::default();
        let base = encode_f32("w", Dtype::BF16, &vals(a * c * b * d, 13)).unwrap();
        let mut want = base.clone();
        add_delta(
            BaseTensorMut::new(Dtype::BF16, &shape, &mut want),
            &delta,
            &opts,
        )
        .unwrap();
        let mut got = base.clone();
        let into = BaseTensorMut::new(Dtype::BF16, &shape, &mut got);
        merge_lokr(into, w1, w2, 0.5, &opts).unwrap();
        assert!(got == want && got != base);
        let (i, j, k, l) = (3, 5, 149, 127);
        assert_eq!(
            delta[(i * c + k) * b * d + j * d + l],
            (v1[i * b + j] * v2[k * d + l]) * 0.5
        );
    }

    /// LoHa merged a block of rows at a time (three blocks here, the last short) gives the
    /// bits of its whole delta added, merged and unmerged, in BF16 and F64.
    #[test]
    fn loha_by_blocks_of_rows_is_the_whole_delta_added() {
        let vals = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k) % 211) as f32 / 53.0 - 2.0)
                .collect()
        };
        let (rows, cols, r) = (600, 1024, 6);
        let f = [
            vals(rows * r, 3),
            vals(r * cols, 5),
            vals(rows * r, 7),
            vals(r * cols, 11),
        ];
        let (left, right) = ([rows, r], [r, cols]);
        let w1 = (F32Tensor::new(&left, &f[0]), F32Tensor::new(&right, &f[1]));
        let w2 = (F32Tensor::new(&left, &f[2]), F32Tensor::new(&right, &f[3]));
        let shape = [rows, cols];
        let delta = loha_delta(&shape, w1.0, w1.1, w2.0, w2.1, 0.5).unwrap();
        for dtype in [Dtype::BF16, Dtype::F64] {
            for unmerge in [false, true] {
                let opts = MergeOptions {
                    unmerge,
                    ..MergeOptions::default()
                };
                let base = encode_f32("w", dtype, &vals(rows * cols, 13)).unwrap();
                let mut want = base.clone();
                add_delta(BaseTensorMut::new(dtype, &shape, &mut want), &delta, &opts).unwrap();
                let mut got = base.clone();
                let into = BaseTensorMut::new(dtype, &shape, &mut got);
                merge_loha(into, w1.0, w1.1, w2.0, w2.1, 0.5, &opts).unwrap();
                assert!(got == want && got != base, "{dtype:?}, unmerge {unmerge}");
            }
        }
        // The whole delta is the products' rows multiplied, then scaled.
        let p1 = lowrank_product(&f[0], &f[1], rows, r, cols, 1.0).unwrap();
        let p2 = lowrank_product(&f[2], &f[3], rows, r, cols, 1.0).unwrap();
        let want: Vec<f32> = p1.iter().zip(&p2).map(|(x, y)| (x * y) * 0.5).collect();
        assert_eq!(delta, want);
    }

    #[test]
    fn trainable_tokens_replace_and_round() {
        let mut w = encode_f32("w", Dtype::BF16, &[0.0; 12]).unwrap();
        let rows = [1.0f32, 2.0, 3.0, 1.0 + 1.0 / 512.0, 5.0, 6.0];
        replace_rows(
            BaseTensorMut::new(Dtype::BF16, &[4, 3], &mut w),
            &[2, 0],
            F32Tensor::new(&[2, 3], &rows),
        )
        .unwrap();
        let back = decode_f32("w", Dtype::BF16, &w).unwrap();
        assert_eq!(
            back,
            vec![1.0, 5.0, 6.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0]
        );
        assert!(replace_rows(
            BaseTensorMut::new(Dtype::BF16, &[4, 3], &mut w),
            &[4],
            F32Tensor::new(&[1, 3], &rows[..3]),
        )
        .is_err());
    }

    #[test]
    fn kron_layout() {
        let w1 = [1.0f32, 2.0];
        let w2 = [1.0f32, 10.0, 100.0, 1000.0];
        let d = lokr_delta(
            &[2, 4],
            LokrFactor::Full(F32Tensor::new(&[1, 2], &w1)),
            LokrFactor::Full(F32Tensor::new(&[2, 2], &w2)),
            1.0,
        )
        .unwrap();
        assert_eq!(d, vec![1.0, 10.0, 2.0, 20.0, 100.0, 1000.0, 200.0, 2000.0]);
    }

    #[test]
    fn ia3_scales_the_right_axis() {
        let w0: Vec<f32> = (1..=6).map(|i| i as f32).collect();
        let mut w = encode_f32("w", Dtype::F32, &w0).unwrap();
        let opts = MergeOptions::default();
        merge_ia3_weight(
            BaseTensorMut::new(Dtype::F32, &[2, 3], &mut w),
            F32Tensor::new(&[2, 1], &[2.0, 3.0]),
            false,
            false,
            1,
            &opts,
        )
        .unwrap();
        assert_eq!(
            decode_f32("w", Dtype::F32, &w).unwrap(),
            vec![2.0, 4.0, 6.0, 12.0, 15.0, 18.0]
        );
        let mut w = encode_f32("w", Dtype::F32, &w0).unwrap();
        merge_ia3_weight(
            BaseTensorMut::new(Dtype::F32, &[2, 3], &mut w),
            F32Tensor::new(&[1, 3], &[1.0, 0.0, 2.0]),
            true,
            false,
            1,
            &opts,
        )
        .unwrap();
        assert_eq!(
            decode_f32("w", Dtype::F32, &w).unwrap(),
            vec![1.0, 0.0, 6.0, 4.0, 0.0, 12.0]
        );
        assert!(merge_ia3_weight(
            BaseTensorMut::new(Dtype::F32, &[2, 3], &mut w),
            F32Tensor::new(&[3, 1], &[1.0, 0.0, 2.0]),
            false,
            false,
            1,
            &opts,
        )
        .is_err());
    }
}
