//! LoRA merge kernels: Linear (incl. GPT-2 `Conv1D` via `fan_in_fan_out`), Embedding,
//! Conv1d/2d/3d, MoE expert parameters (`target_parameters`), `lora_bias`, unmerge.
//!
//! Every kernel updates a base tensor in place and reproduces peft 0.21.2's
//! `merge_and_unload()` on CPU bit for bit (docs/formats.md, "Merge numerics"; peft's `lora/layer.py` `get_delta_weight`):
//!
//! ```text
//! P  = B @ A                        f32, MKL reduction order (see `gemm`)
//! Δ  = fl32(P · s32)                s32 = f32(alpha / r) computed in f64
//! W' = fl_dtype( f32(W) + Δ )       Linear / Conv, unsafe merge: ONE rounding
//! W' = fl_dtype( f32(W) + f32(fl_dtype(Δ)) )
//!                                   Embedding, experts, safe_merge, `round_delta_first`:
//!                                   Δ rounded to the base dtype first (double rounding)
//! ```
//!
//! The delta is computed row by row and never materialised as a whole, so the extra memory is
//! one block of rows plus the (small) factors.

use std::borrow::Cow;
use std::ops::{AddAssign, Range, SubAssign};

use safetensors::Dtype;

use super::apply::{update_rows, BaseTensorMut, BlockIo, F32Tensor, Rows};
use super::dtype::element_size;
use super::dtype::round_slice_to;
use super::error::{check_rank, check_shape, numel, MergeMathError, Result};
use super::exact::{self, Numerics};
use super::fused;
use super::gemm::{product_rows, Product};
use super::order::active_k_blocks;

/// How a kernel combines the delta with the base weight.
///
/// The default (all `false`/`None`) is peft's `merge_and_unload()`: unsafe merge with f32
/// (autocast) adapters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeOptions {
    /// peft `safe_merge=True`: Δ is rounded to the base dtype before the add (it differs from
    /// the default in ~15–25 % of BF16 elements), and any NaN/±Inf in the stored result is a
    /// [`MergeMathError::NonFinite`] error. On error the buffer is partially merged: discard it.
    pub safe_merge: bool,
    /// Round Δ to the base dtype before adding even in an unsafe merge. peft does this for
    /// `nn.MultiheadAttention` `in_proj`/`out_proj` and for 2-D `target_parameters`; the
    /// embedding and expert kernels always do it.
    pub round_delta_first: bool,
    /// peft `unmerge()`: `W -= Δ.to(W.dtype)` instead of adding. Not an exact inverse in 16-bit.
    pub unmerge: bool,
    /// Adapter dtype when peft ran with `autocast_adapter_dtype=False` and the adapter is
    /// BF16/F16 on CPU: Δ is then computed in f32 and rounded to this dtype before use
    /// (docs/formats.md, "Merge numerics"). `None` (or `Some(F32)`) is the default f32 adapter.
    pub adapter_dtype: Option<Dtype>,
    /// [`Numerics::Exact`] replaces peft's arithmetic by one correct rounding of the exact
    /// result (see [`Numerics::Exact`]). peft's intermediate roundings then do not apply:
    /// `round_delta_first`, `adapter_dtype` and the embedding/expert double rounding are
    /// ignored, and `safe_merge` only adds the finiteness check.
    pub numerics: Numerics,
}

peftkit_checkpoint::option_setters!(MergeOptions {
    safe_merge: bool,
    round_delta_first: bool,
    unmerge: bool,
    adapter_dtype: Some(Dtype),
    numerics: Numerics,
});

impl MergeOptions {
    fn adapter_round(&self) -> Result<Option<Dtype>> {
        adapter_rounding(self.adapter_dtype)
    }

    /// Whether `Δ` is rounded to the base dtype before the add: as peft's `safe_merge` and
    /// unmerge do, where asked (`round_delta_first`), and for layers peft always rounds it for
    /// (`layer_rounds`: embeddings, experts).
    fn rounds_delta_first(&self, layer_rounds: bool) -> bool {
        layer_rounds || self.safe_merge || self.round_delta_first || self.unmerge
    }

    /// Whether a result holding NaN or infinity is refused: `safe_merge`, which peft's unmerge
    /// does not check.
    pub(crate) fn checks_result(&self) -> bool {
        self.safe_merge && !self.unmerge
    }
}

/// The dtype Δ is rounded to for an `adapter_dtype` (see [`MergeOptions::adapter_dtype`]):
/// `None` for f32 adapters.
fn adapter_rounding(adapter_dtype: Option<Dtype>) -> Result<Option<Dtype>> {
    match adapter_dtype {
        None | Some(Dtype::F32) => Ok(None),
        Some(d @ (Dtype::BF16 | Dtype::F16)) => Ok(Some(d)),
        Some(other) => Err(MergeMathError::UnsupportedDtype {
            what: "adapter dtype",
            dtype: other,
        }),
    }
}

/// A batch of low-rank products `Δ_e = s · L_e @ R_e`, laid out so that row `g` of the base
/// tensor (viewed as `batch·rows × n`) is row `g % rows` of `Δ_{g / rows}`.
pub(crate) struct LowRank<'a> {
    /// `batch·rows × r`.
    left: Cow<'a, [f32]>,
    /// `batch × r × n`.
    right: Cow<'a, [f32]>,
    rows: usize,
    r: usize,
    n: usize,
    scale: f32,
    blocks: Vec<Range<usize>>,
    adapter_round: Option<Dtype>,
}

impl<'a> LowRank<'a> {
    /// `left` is `batch·rows × r`, `right` `batch × r × n`.
    fn new(
        left: Cow<'a, [f32]>,
        right: Cow<'a, [f32]>,
        (rows, r, n): (usize, usize, usize),
        scale: f32,
        adapter_round: Option<Dtype>,
    ) -> Self {
        LowRank {
            left,
            right,
            rows,
            r,
            n,
            scale,
            blocks: active_k_blocks(r),
            adapter_round,
        }
    }

    /// `s · B @ A` for `b` `(out × r)` and `a` `(r × n)`, in the layout of the product: `out × n`.
    fn product(
        b: &'a [f32],
        a: &'a [f32],
        (out, r, n): (usize, usize, usize),
        scale: f32,
        adapter_round: Option<Dtype>,
    ) -> Self {
        let (left, right) = (Cow::Borrowed(b), Cow::Borrowed(a));
        Self::new(left, right, (out, r, n), scale, adapter_round)
    }

    /// `s · (B @ A)ᵀ` for `b` `(out × r)` and `a` `(r × n)`: `n × out`, row `i` being
    /// `Σ_k A[k, i] · B[:, k]`, the same products in the same `k` order as torch's `B @ A`, since
    /// `fma(x, y, z) = fma(y, x, z)`.
    fn product_transposed(
        b: &[f32],
        a: &[f32],
        (out, r, n): (usize, usize, usize),
        scale: f32,
        adapter_round: Option<Dtype>,
    ) -> Self {
        let left = Cow::Owned(transpose(a, r, n));
        let right = Cow::Owned(transpose(b, out, r));
        Self::new(left, right, (n, r, out), scale, adapter_round)
    }

    /// Row length of the delta (= of the base tensor view).
    pub(crate) fn row_len(&self) -> usize {
        self.n
    }

    /// Fills `out` (`k × n`) with delta rows `first_row..first_row + k`.
    pub(crate) fn delta_rows(&self, first_row: usize, out: &mut [f32]) -> Result<()> {
        let (r, n) = (self.r, self.n);
        if n == 0 {
            return Ok(());
        }
        let end = first_row + out.len() / n;
        let mut g = first_row;
        while g < end {
            let e = g / self.rows.max(1);
            let seg_end = end.min((e + 1) * self.rows);
            let off = (g - first_row) * n;
            product_rows(
                &self.left[g * r..seg_end * r],
                &self.right[e * r * n..(e + 1) * r * n],
                r,
                n,
                &self.blocks,
                self.scale,
                &mut out[off..off + (seg_end - g) * n],
            );
            g = seg_end;
        }
        if let Some(dt) = self.adapter_round {
            round_slice_to(dt, out)?;
        }
        Ok(())
    }

    /// Delta rows `first_row..` for a block of `len` base elements, in `scratch` (resized).
    pub(crate) fn delta_block<'s>(
        &self,
        first_row: usize,
        len: usize,
        scratch: &'s mut Vec<f32>,
    ) -> Result<&'s mut [f32]> {
        scratch.resize(len, 0.0);
        let d = &mut scratch[..len];
        self.delta_rows(first_row, d)?;
        Ok(d)
    }

    /// Adds `Δ` rows `first_row..` to `rows` (whole rows of `f32` values, as DoRA adds them
    /// before taking its norm): through the fused kernel on an `f32` target where it runs (one
    /// add in `f32` per element, `Δ` never written to memory), else from `scratch`. The same
    /// bits either way, `Δ = fl32(P · s)` then one `f32` add (see [`super::fused`]).
    pub(crate) fn add_rows_f32(
        &self,
        what: &'static str,
        first_row: usize,
        rows: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        let (r, n) = (self.r, self.n);
        let k = rows.len().checked_div(n).unwrap_or(0);
        let left = self.left.get(first_row * r..(first_row + k) * r);
        // One product (no expert batch) and no rounding of `Δ` before the add.
        let single = self.right.len() == r * n && self.adapter_round.is_none();
        if let (Some(left), true) = (left, single && n > 0) {
            let product = Product {
                left,
                rows: k,
                ..self.as_product(false)
            };
            let chain = [fused::Fused {
                product,
                blocks: &self.blocks,
                round_first: false,
            }];
            let target = fused::Target::Memory(bytemuck::cast_slice_mut(rows));
            let added = fused::add_in_place(&chain, Dtype::F32, target, false)
                .map_err(|_| MergeMathError::BaseUnread { what })?;
            if added.is_some() {
                return Ok(());
            }
        }
        let d = self.delta_block(first_row, rows.len(), scratch)?;
        for (x, y) in rows.iter_mut().zip(d.iter()) {
            *x += *y;
        }
        Ok(())
    }

    /// Merges (or unmerges) `Δ` into `base` through the fused kernel (see [`super::fused`] and
    /// [`Self::fused`]); `Ok(false)`, with `base` untouched, when its dtype has no fused path.
    /// Under `safe_merge` a result holding NaN or infinity is [`MergeMathError::NonFinite`],
    /// counted over the whole tensor as the general path counts.
    fn try_add_fused(
        &self,
        what: &'static str,
        base: &mut BaseTensorMut<'_>,
        opts: &MergeOptions,
        layer_rounds: bool,
    ) -> Result<bool> {
        let total = base.validate(what, true)?;
        if self.n == 0 || total != self.left.len() / self.r.max(1) * self.n {
            return Ok(false);
        }
        let target = fused::Target::Memory(base.data);
        let check = opts.checks_result();
        let test = base.probe.is_some() || check;
        let update = [self.fused(opts, layer_rounds)];
        let fused = fused::add_in_place(&update, base.dtype, target, test)
            .map_err(|_| MergeMathError::BaseUnread { what })?;
        if let (Some(finite), Some(probe)) = (fused, base.probe) {
            probe.record(finite);
        }
        if let (Some(false), true) = (fused, check) {
            if let Some((count, first)) = peftkit_checkpoint::nonfinite(base.dtype, base.data) {
                return Err(MergeMathError::NonFinite { what, count, first });
            }
        }
        Ok(fused.is_some())
    }

    /// Whether merging this product takes the fused kernel: peft's numerics and an f32
    /// adapter. An unmerge adds `-Δ` there ([`Self::fused`]), which gives the bits of peft's
    /// `W - Δ` for every value, NaN included: `-Δ` is `fl32(P · -s)`, and a multiply returns its
    /// NaN operand unchanged, so a NaN in `-Δ` is `Δ`'s own (not sign-flipped), which is what
    /// a subtraction returns too (a test holds the two paths together in every dtype).
    fn fuses(&self, opts: &MergeOptions) -> bool {
        opts.numerics != Numerics::Exact && self.adapter_round.is_none()
    }

    /// The update as the fused kernel takes it: `Δ`, or `-Δ` for an unmerge (`fl32(P · -s)` is
    /// `-fl32(P · s)` but for NaN, which keeps its bits; rounding to the base dtype is
    /// symmetric too), rounded to the base dtype before the add where peft rounds it
    /// ([`MergeOptions::rounds_delta_first`]).
    fn fused(&self, opts: &MergeOptions, layer_rounds: bool) -> fused::Fused<'_> {
        fused::Fused {
            product: self.as_product(opts.unmerge),
            blocks: &self.blocks,
            round_first: opts.rounds_delta_first(layer_rounds),
        }
    }

    /// The product as the fused and exact kernels take it; `negate` for an unmerge.
    fn as_product(&self, negate: bool) -> Product<'_> {
        Product {
            left: &self.left,
            right: &self.right,
            rows: self.rows,
            k: self.r,
            n: self.n,
            scale: if negate { -self.scale } else { self.scale },
        }
    }

    /// The whole delta, `batch·rows × n`.
    pub(crate) fn full(&self) -> Result<Vec<f32>> {
        let total_rows = self.left.len() / self.r.max(1);
        let mut out = vec![0f32; total_rows * self.n];
        self.delta_rows(0, &mut out)?;
        Ok(out)
    }
}

/// Adds (or, for unmerge, subtracts) a low-rank delta to `base`, row block by row block.
fn apply_lowrank(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    lr: &LowRank<'_>,
    opts: &MergeOptions,
    always_round_first: bool,
) -> Result<()> {
    let check = opts.checks_result();
    if opts.numerics == Numerics::Exact {
        exact::merge_lowrank(what, base, &lr.as_product(opts.unmerge), check)?;
        return Ok(());
    }
    let dtype = base.dtype;
    let round_first = opts.rounds_delta_first(always_round_first);
    let sign_sub = opts.unmerge;
    // An f32 adapter has a fused kernel, rounding `Δ` first or not.
    if lr.fuses(opts) && lr.try_add_fused(what, base, opts, always_round_first)? {
        return Ok(());
    }
    update_rows(
        what,
        base,
        lr.row_len(),
        check,
        |first_row, rows, scratch| {
            match rows {
                Rows::F32(w) => {
                    let d = lr.delta_block(first_row, w.len(), scratch)?;
                    if round_first {
                        round_slice_to(dtype, d)?;
                    }
                    accumulate(w, d, sign_sub);
                }
                Rows::F64(w) => {
                    // torch promotes `f64 += f32` to f64: the f32 delta widens exactly.
                    let d = lr.delta_block(first_row, w.len(), scratch)?;
                    accumulate(w, d, sign_sub);
                }
            }
            Ok(())
        },
    )
}

/// `w += d` (or `w -= d` with `sub`) elementwise, `d` widened to the type of `w` (exact).
#[inline(always)]
fn accumulate<T: Copy + From<f32> + AddAssign + SubAssign>(w: &mut [T], d: &[f32], sub: bool) {
    if sub {
        w.iter_mut().zip(d).for_each(|(x, y)| *x -= T::from(*y));
    } else {
        w.iter_mut().zip(d).for_each(|(x, y)| *x += T::from(*y));
    }
}

/// Refuses a LoRA rank of 0 (the factor named `what` has no rows).
fn check_nonzero_rank(what: &'static str, r: usize) -> Result<()> {
    if r == 0 {
        return Err(MergeMathError::Invalid {
            what,
            reason: "rank 0".into(),
        });
    }
    Ok(())
}

/// Transposes a row-major `rows × cols` matrix.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// Checks `lora_A` `(r, in)` / `lora_B` `(out, r)` of a linear-like layer; returns `(out, r, in)`.
fn linear_factors(a: &F32Tensor<'_>, b: &F32Tensor<'_>) -> Result<(usize, usize, usize)> {
    a.validate("lora_A")?;
    b.validate("lora_B")?;
    check_rank("lora_A", a.shape, 2, 2, "2")?;
    check_rank("lora_B", b.shape, 2, 2, "2")?;
    let (r, inf) = (a.shape[0], a.shape[1]);
    let out = b.shape[0];
    check_shape("lora_B", b.shape, &[out, r])?;
    check_nonzero_rank("lora_A", r)?;
    Ok((out, r, inf))
}

/// Builds the row producer of a Linear / `Conv1D` delta in the base layout.
pub(crate) fn linear_lowrank<'a>(
    base_shape: &[usize],
    a: &F32Tensor<'a>,
    b: &F32Tensor<'a>,
    scale: f32,
    fan_in_fan_out: bool,
    adapter_round: Option<Dtype>,
) -> Result<LowRank<'a>> {
    let (out, r, inf) = linear_factors(a, b)?;
    check_rank("base weight", base_shape, 2, 2, "2")?;
    let dims = (out, r, inf);
    if fan_in_fan_out {
        // W is (in, out): base row i is Δᵀ[i, :].
        check_shape(
            "base weight (fan_in_fan_out: in, out)",
            base_shape,
            &[inf, out],
        )?;
        Ok(LowRank::product_transposed(
            b.data,
            a.data,
            dims,
            scale,
            adapter_round,
        ))
    } else {
        check_shape("base weight (out, in)", base_shape, &[out, inf])?;
        Ok(LowRank::product(b.data, a.data, dims, scale, adapter_round))
    }
}

/// LoRA delta of a `Linear` (or, with `fan_in_fan_out`, a transformers `Conv1D`) in the layout
/// of its weight: `(out, in)`, or `(in, out)` with `fan_in_fan_out`. Values are `fl32(P · s)`
/// (rounded to `adapter_dtype` if given), exactly peft's `get_delta_weight`.
pub fn linear_delta(
    base_shape: &[usize],
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    scale: f32,
    fan_in_fan_out: bool,
    adapter_dtype: Option<Dtype>,
) -> Result<Vec<f32>> {
    let round = adapter_rounding(adapter_dtype)?;
    linear_lowrank(base_shape, &a, &b, scale, fan_in_fan_out, round)?.full()
}

/// Merges a LoRA adapter into a `Linear` weight `(out, in)` — or a transformers `Conv1D`
/// weight `(in, out)` when `fan_in_fan_out` — in place.
///
/// `a` is `lora_A.weight` `(r, in)`, `b` is `lora_B.weight` `(out, r)`, `scale` from
/// [`lora_scaling`](peftkit_peft::lora_scaling). Base dtypes F32/BF16/F16/F64.
///
/// ```
/// use peftkit_merge::{
///     decode_f32, encode_f32, merge_linear, BaseTensorMut, F32Tensor, MergeOptions,
/// };
/// use safetensors::Dtype;
///
/// // W (2, 3) in BF16, a rank-1 adapter: W += 2 · B @ A.
/// let mut w = encode_f32("W", Dtype::BF16, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
/// let (a, b) = ([1.0, 0.0, -1.0], [0.5, 0.25]);
/// merge_linear(
///     BaseTensorMut::new(Dtype::BF16, &[2, 3], &mut w),
///     F32Tensor::new(&[1, 3], &a),
///     F32Tensor::new(&[2, 1], &b),
///     2.0,
///     false,
///     &MergeOptions::default(),
/// )?;
/// assert_eq!(decode_f32("W", Dtype::BF16, &w)?, [2.0, 2.0, 2.0, 4.5, 5.0, 5.5]);
/// # Ok::<(), peftkit_merge::MergeMathError>(())
/// ```
pub fn merge_linear(
    mut base: BaseTensorMut<'_>,
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    scale: f32,
    fan_in_fan_out: bool,
    opts: &MergeOptions,
) -> Result<()> {
    let kind = LoraKind::Linear { fan_in_fan_out };
    let round = opts.adapter_round()?;
    let (lr, layer_rounds) = kind.lowrank(base.shape, (&a, &b), scale, round)?;
    apply_lowrank(kind.what(), &mut base, &lr, opts, layer_rounds)
}

/// A base tensor that is in no buffer: streamed through a kernel block by block (see
/// [`fused::Target::Streamed`]).
#[derive(Clone, Copy)]
pub(crate) struct StreamedBase<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Its length in bytes.
    pub len: usize,
    pub io: &'a dyn BlockIo,
    /// Test each merged block for NaN and infinity.
    pub check: bool,
}

/// The layer type a LoRA pair adapts, which decides where `Δ`'s factors lie.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LoraKind {
    Linear { fan_in_fan_out: bool },
    Embedding,
    Conv,
}

impl LoraKind {
    /// What errors call this layer's weight.
    fn what(self) -> &'static str {
        match self {
            LoraKind::Linear { .. } => "linear weight",
            LoraKind::Embedding => "embedding weight",
            LoraKind::Conv => "conv weight",
        }
    }

    /// This layer's `Δ` for a base of `shape` (a Conv's `groups` being 1), and whether peft
    /// rounds `Δ` to the base dtype before the add whatever the options: an Embedding's merge
    /// adds `get_delta_weight(...).to(dtype)`.
    pub(crate) fn lowrank<'a>(
        self,
        shape: &[usize],
        (a, b): (&F32Tensor<'a>, &F32Tensor<'a>),
        scale: f32,
        adapter_round: Option<Dtype>,
    ) -> Result<(LowRank<'a>, bool)> {
        Ok(match self {
            LoraKind::Linear { fan_in_fan_out } => (
                linear_lowrank(shape, a, b, scale, fan_in_fan_out, adapter_round)?,
                false,
            ),
            LoraKind::Embedding => (embedding_lowrank(shape, a, b, scale, adapter_round)?, true),
            LoraKind::Conv => (conv_lowrank(shape, a, b, scale, 1, adapter_round)?, false),
        })
    }
}

/// A LoRA update of a layer of `kind`, as [`merge_linear`], [`merge_embedding`] and
/// [`merge_conv`] take it.
pub(crate) struct StreamedLora<'a> {
    pub a: F32Tensor<'a>,
    pub b: F32Tensor<'a>,
    pub scale: f32,
    pub kind: LoraKind,
    pub opts: MergeOptions,
}

/// The merge of each update of `chain` in order, on a streamed base: each block is read, gets
/// every update and is written back while in cache, with the bits of merging the whole tensor
/// once per update. `Ok(None)`, having read and written nothing, when some update has no fused
/// path (the caller then merges in memory); else `Some(false)` when a tested block holds NaN
/// or infinity. A failed read or write is [`MergeMathError::BaseUnread`]; `io` keeps the
/// cause.
pub(crate) fn stream_lora(
    base: StreamedBase<'_>,
    chain: &[StreamedLora<'_>],
) -> Result<Option<bool>> {
    let what = chain.first().map_or("weight", |u| u.kind.what());
    let elems = base.len / element_size(base.dtype)?;
    let mut ranks = Vec::with_capacity(chain.len());
    for u in chain {
        let round = u.opts.adapter_round()?;
        let (lr, layer_rounds) = u.kind.lowrank(base.shape, (&u.a, &u.b), u.scale, round)?;
        if !lr.fuses(&u.opts)
            || lr.n == 0
            || elems != numel(what, base.shape)?
            || elems != lr.left.len() / lr.r.max(1) * lr.n
        {
            return Ok(None);
        }
        ranks.push((lr, layer_rounds));
    }
    let updates: Vec<fused::Fused<'_>> = (ranks.iter().zip(chain))
        .map(|((lr, layer_rounds), u)| lr.fused(&u.opts, *layer_rounds))
        .collect();
    let target = fused::Target::Streamed {
        len: base.len,
        io: base.io,
    };
    fused::add_in_place(&updates, base.dtype, target, base.check)
        .map_err(|_| MergeMathError::BaseUnread { what })
}

/// Checks embedding factors against the base `(num_embeddings, dim)`; returns the producer.
pub(crate) fn embedding_lowrank<'a>(
    base_shape: &[usize],
    a: &F32Tensor<'a>,
    b: &F32Tensor<'a>,
    scale: f32,
    adapter_round: Option<Dtype>,
) -> Result<LowRank<'a>> {
    a.validate("lora_embedding_A")?;
    b.validate("lora_embedding_B")?;
    check_rank("lora_embedding_A", a.shape, 2, 2, "2")?;
    check_rank("lora_embedding_B", b.shape, 2, 2, "2")?;
    check_rank("base embedding", base_shape, 2, 2, "2")?;
    let (r, vocab) = (a.shape[0], a.shape[1]);
    let dim = b.shape[0];
    check_shape("lora_embedding_B", b.shape, &[dim, r])?;
    check_shape(
        "base embedding (num_embeddings, dim)",
        base_shape,
        &[vocab, dim],
    )?;
    check_nonzero_rank("lora_embedding_A", r)?;
    // Δ[v, d] = s · Σ_k B[d, k] · A[k, v] = (B @ A)ᵀ[v, d].
    Ok(LowRank::product_transposed(
        b.data,
        a.data,
        (dim, r, vocab),
        scale,
        adapter_round,
    ))
}

/// LoRA delta of an `Embedding`, `(num_embeddings, dim)`: `Δ[v, d] = s · Σ_k B[d,k] · A[k,v]`.
pub fn embedding_delta(
    base_shape: &[usize],
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    scale: f32,
    adapter_dtype: Option<Dtype>,
) -> Result<Vec<f32>> {
    let round = adapter_rounding(adapter_dtype)?;
    embedding_lowrank(base_shape, &a, &b, scale, round)?.full()
}

/// Merges a LoRA adapter into an `Embedding` weight `(num_embeddings, dim)` in place.
///
/// `a` is `lora_embedding_A` `(r, num_embeddings)`, `b` is `lora_embedding_B` `(dim, r)`.
/// peft's embedding merge always rounds Δ to the base dtype before adding (safe or not).
pub fn merge_embedding(
    mut base: BaseTensorMut<'_>,
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    scale: f32,
    opts: &MergeOptions,
) -> Result<()> {
    let round = opts.adapter_round()?;
    let (lr, layer_rounds) = LoraKind::Embedding.lowrank(base.shape, (&a, &b), scale, round)?;
    let what = LoraKind::Embedding.what();
    apply_lowrank(what, &mut base, &lr, opts, layer_rounds)
}

/// Checks conv factors against the base `(out, in, *kernel)`; returns the producer.
pub(crate) fn conv_lowrank<'a>(
    base_shape: &[usize],
    a: &F32Tensor<'a>,
    b: &F32Tensor<'a>,
    scale: f32,
    groups: usize,
    adapter_round: Option<Dtype>,
) -> Result<LowRank<'a>> {
    a.validate("lora_A")?;
    b.validate("lora_B")?;
    check_rank("base conv weight", base_shape, 3, 5, "3 to 5")?;
    if groups != 1 {
        // peft raises NotImplementedError for grouped convolutions (PR #2403).
        return Err(MergeMathError::Invalid {
            what: "conv groups",
            reason: format!(
                "merging is not supported for groups = {groups} (peft refuses groups > 1)"
            ),
        });
    }
    let nd = base_shape.len();
    check_rank("lora_A", a.shape, nd, nd, "same rank as the base weight")?;
    check_rank("lora_B", b.shape, nd, nd, "same rank as the base weight")?;
    let r = a.shape[0];
    let out = base_shape[0];
    let mut a_expected = vec![r];
    a_expected.extend_from_slice(&base_shape[1..]);
    check_shape("lora_A (r, in, *kernel)", a.shape, &a_expected)?;
    let mut b_expected = vec![out, r];
    b_expected.resize(nd, 1);
    check_shape("lora_B (out, r, 1, …)", b.shape, &b_expected)?;
    check_nonzero_rank("lora_A", r)?;
    let row_len = a.data.len() / r;
    // Δ[o, i, *k] = s · Σ_r B[o, r] · A[r, i, *k]: a (out × r)(r × in·K) product.
    Ok(LowRank::product(
        b.data,
        a.data,
        (out, r, row_len),
        scale,
        adapter_round,
    ))
}

/// LoRA delta of a `Conv1d/2d/3d` weight `(out, in, *kernel)`.
pub fn conv_delta(
    base_shape: &[usize],
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    scale: f32,
    groups: usize,
    adapter_dtype: Option<Dtype>,
) -> Result<Vec<f32>> {
    let round = adapter_rounding(adapter_dtype)?;
    conv_lowrank(base_shape, &a, &b, scale, groups, round)?.full()
}

/// Merges a LoRA adapter into a `Conv1d/2d/3d` weight `(out, in, *kernel)` in place.
///
/// `a` is `lora_A.weight` `(r, in, *kernel)`, `b` is `lora_B.weight` `(out, r, 1, …)`.
/// `groups > 1` is refused, as by peft. Both of peft's branches (the 1×1 matmul and the
/// `convNd(Aᵀ, B)` one) compute `Σ_r B[o,r]·A[r,i,k]`, here as a sequential FMA over the rank.
///
/// Measured exactness of the `convNd` branch (oneDNN): bit-exact for Conv1d/Conv3d and for
/// Conv2d with `in_channels ≥ 16` (e.g. 64×128×3×3 r=32, 32×16×3×3 r=8). For a 3×3 Conv2d with
/// fewer than 16 input channels oneDNN picks another kernel (for r=4 an unfused multiply-add);
/// f32 results then differ in the last bits (measured: 96 of 540 elements of a 10×6×3×3 r=4
/// delta), which is not emulated.
pub fn merge_conv(
    mut base: BaseTensorMut<'_>,
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    scale: f32,
    groups: usize,
    opts: &MergeOptions,
) -> Result<()> {
    // Not `LoraKind::lowrank`: `groups` is checked here (peft refuses groups > 1).
    let lr = conv_lowrank(base.shape, &a, &b, scale, groups, opts.adapter_round()?)?;
    apply_lowrank(LoraKind::Conv.what(), &mut base, &lr, opts, false)
}

/// Memory layout of a 3-D expert parameter `(E, a, b)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// `(E, out, in)` — the default: peft swaps in/out unless the module has
    /// `is_transposed = True` (transformers v5 Mixtral `gate_up_proj`, `down_proj`).
    OutIn,
    /// `(E, in, out)` — modules with `is_transposed = True`.
    InOut,
}

fn experts_lowrank<'a>(
    base_shape: &[usize],
    a: &F32Tensor<'a>,
    b: &F32Tensor<'a>,
    scale: f32,
    layout: ExpertLayout,
) -> Result<LowRank<'a>> {
    a.validate("lora_A")?;
    b.validate("lora_B")?;
    check_rank("base expert parameter", base_shape, 3, 3, "3")?;
    check_rank("lora_A", a.shape, 2, 2, "2")?;
    check_rank("lora_B", b.shape, 2, 2, "2")?;
    let e = base_shape[0];
    let (out, inf) = match layout {
        ExpertLayout::OutIn => (base_shape[1], base_shape[2]),
        ExpertLayout::InOut => (base_shape[2], base_shape[1]),
    };
    let re = a.shape[0];
    if e == 0 || !re.is_multiple_of(e) || re == 0 {
        return Err(MergeMathError::Invalid {
            what: "lora_A",
            reason: format!("{re} rows are not a positive multiple of {e} experts"),
        });
    }
    let r = re / e;
    check_shape("lora_A (r·E, in)", a.shape, &[re, inf])?;
    check_shape("lora_B (out, r·E)", b.shape, &[out, re])?;
    // A rows are expert-major (row e·r + k); B columns are rank-major (column k·E + e).
    let b_of = |o: usize, k: usize, ex: usize| b.data[o * re + k * e + ex];
    match layout {
        ExpertLayout::OutIn => {
            let mut left = vec![0f32; e * out * r];
            for ex in 0..e {
                for o in 0..out {
                    for k in 0..r {
                        left[(ex * out + o) * r + k] = b_of(o, k, ex);
                    }
                }
            }
            let (left, right) = (Cow::Owned(left), Cow::Borrowed(a.data));
            Ok(LowRank::new(left, right, (out, r, inf), scale, None))
        }
        ExpertLayout::InOut => {
            let mut left = vec![0f32; e * inf * r];
            let mut right = vec![0f32; e * r * out];
            for ex in 0..e {
                for k in 0..r {
                    for i in 0..inf {
                        left[(ex * inf + i) * r + k] = a.data[(ex * r + k) * inf + i];
                    }
                    for o in 0..out {
                        right[(ex * r + k) * out + o] = b_of(o, k, ex);
                    }
                }
            }
            let (left, right) = (Cow::Owned(left), Cow::Owned(right));
            Ok(LowRank::new(left, right, (inf, r, out), scale, None))
        }
    }
}

/// LoRA delta of a 3-D expert parameter, in the parameter's layout (see [`merge_experts`]).
pub fn experts_delta(
    base_shape: &[usize],
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    scale: f32,
    layout: ExpertLayout,
) -> Result<Vec<f32>> {
    experts_lowrank(base_shape, &a, &b, scale, layout)?.full()
}

/// Merges a `target_parameters` LoRA into a 3-D MoE expert parameter in place.
///
/// `a` is `lora_A.weight` `(r·E, in)` with expert-major rows, `b` is `lora_B.weight`
/// `(out, r·E)` with rank-major columns (peft's asymmetric reshape in `lora/layer.py` `ParamWrapper.get_delta_weight`):
/// `Δ[e, o, i] = s · Σ_k B[o, k·E + e] · A[e·r + k, i]`. peft rounds Δ to the parameter dtype
/// before adding. `adapter_dtype` is refused here: peft's expert einsum does not upcast.
pub fn merge_experts(
    mut base: BaseTensorMut<'_>,
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    scale: f32,
    layout: ExpertLayout,
    opts: &MergeOptions,
) -> Result<()> {
    if opts.adapter_round()?.is_some() {
        return Err(MergeMathError::Invalid {
            what: "adapter dtype",
            reason: "expert parameters are only supported with f32 (autocast) adapters".into(),
        });
    }
    let lr = experts_lowrank(base.shape, &a, &b, scale, layout)?;
    apply_lowrank("expert parameter", &mut base, &lr, opts, true)
}

/// Merges `lora_bias=True`'s `lora_B.bias` into the base bias in place:
/// `b' = fl_dtype(f32(b) + fl32(lora_B.bias · s))` (one rounding, safe or not; unmerge
/// subtracts the same term).
///
/// With `safe_merge`, peft checks finiteness of the f32 sum before its rounding; this kernel
/// checks the stored value, so it also rejects a sum that overflows the base dtype.
pub fn merge_lora_bias(
    mut bias: BaseTensorMut<'_>,
    lora_b_bias: F32Tensor<'_>,
    scale: f32,
    opts: &MergeOptions,
) -> Result<()> {
    lora_b_bias.validate("lora_B.bias")?;
    check_rank("base bias", bias.shape, 1, 1, "1")?;
    check_shape("lora_B.bias", lora_b_bias.shape, bias.shape)?;
    if opts.numerics == Numerics::Exact {
        // `s · 1 · bias_B`: a rank-1 product whose only left factor is 1.
        let n = lora_b_bias.data.len();
        let lr = LowRank::product(&[1.0], lora_b_bias.data, (1, 1, n), scale, None);
        return apply_lowrank("bias", &mut bias, &lr, opts, false);
    }
    let mut term: Vec<f32> = lora_b_bias.data.iter().map(|x| x * scale).collect();
    if let Some(dt) = opts.adapter_round()? {
        round_slice_to(dt, &mut term)?;
    }
    let sub = opts.unmerge;
    let len = term.len();
    update_rows(
        "bias",
        &mut bias,
        len,
        opts.checks_result(),
        |_, rows, _| {
            match rows {
                Rows::F32(w) => accumulate(w, &term, sub),
                Rows::F64(w) => accumulate(w, &term, sub),
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dtype::{decode_f32, encode_f32};
    use peftkit_peft::lora_scaling;

    /// An unmerge is `W - fl_dtype(Δ)`, one rounding, as peft's `W -= Δ.to(W.dtype)`: through
    /// the fused kernel (which adds `-Δ`), with NaN, infinite and subnormal deltas among the
    /// values, the bits of the subtraction in every dtype.
    #[test]
    fn unmerges_subtract_the_rounded_delta_in_every_dtype() {
        let (rows, cols, r) = (37, 70, 4);
        let a: Vec<f32> = (0..r * cols)
            .map(|i| ((i * 13) % 97) as f32 / 31.0 - 1.5)
            .collect();
        let mut b: Vec<f32> = (0..rows * r)
            .map(|i| ((i * 29) % 89) as f32 / 17.0 - 2.5)
            .collect();
        // Row 3 of Δ is NaN, row 5 infinite where A is positive, row 8 subnormal.
        b[3 * r] = f32::NAN;
        b[5 * r + 1] = f32::INFINITY;
        b[8 * r..9 * r].iter_mut().for_each(|x| *x *= 1e-38);
        let (a_shape, b_shape) = ([r, cols], [rows, r]);
        let (a_t, b_t) = (F32Tensor::new(&a_shape, &a), F32Tensor::new(&b_shape, &b));
        let shape = [rows, cols];
        let delta = linear_delta(&shape, a_t, b_t, 1.25, false, None).unwrap();
        let w0: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7) % 83) as f32 / 9.0 - 4.0)
            .collect();
        let opts = MergeOptions {
            unmerge: true,
            ..MergeOptions::default()
        };
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let mut w = encode_f32("w", dtype, &w0).unwrap();
            let base = decode_f32("w", dtype, &w).unwrap();
            let want: Vec<f32> = base
                .iter()
                .zip(&delta)
                .map(|(x, d)| x - crate::kernels::round_f32_to(dtype, *d).unwrap())
                .collect();
            let want = encode_f32("w", dtype, &want).unwrap();
            let into = BaseTensorMut::new(dtype, &shape, &mut w);
            merge_linear(into, a_t, b_t, 1.25, false, &opts).unwrap();
            assert!(w == want, "{dtype:?}");
        }
    }

    /// Embeddings and convolutions stream as Linear weights do: over several blocks, the bits
    /// of their merge in memory (an embedding's `Δ` rounded to the base dtype first).
    #[test]
    fn embeddings_and_convs_stream_to_the_bits_of_the_merge_in_memory() {
        let vals = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k) % 251) as f32 / 97.0 - 1.3)
                .collect()
        };
        // BF16 rows of 2 KiB: streamed blocks of 512 rows, the last short.
        let (rows, cols, r) = (1100, 1024, 8);
        let base = encode_f32("w", Dtype::BF16, &vals(rows * cols, 7)).unwrap();
        let (a_emb, b_emb) = (vals(r * rows, 13), vals(cols * r, 29));
        let (a_conv, b_conv) = (vals(r * cols, 17), vals(rows * r, 31));
        let shapes = [[r, rows], [cols, r]];
        let emb = (
            F32Tensor::new(&shapes[0], &a_emb),
            F32Tensor::new(&shapes[1], &b_emb),
        );
        // A Conv1d (out, in, kernel) of 1100 x 256 x 4: rows of 1024 again.
        let conv_shapes = [[r, 256, 4], [rows, r, 1]];
        let conv = (
            F32Tensor::new(&conv_shapes[0], &a_conv),
            F32Tensor::new(&conv_shapes[1], &b_conv),
        );
        let opts = MergeOptions::default();
        for (kind, shape, (a, b)) in [
            (LoraKind::Embedding, vec![rows, cols], emb),
            (LoraKind::Conv, vec![rows, 256, 4], conv),
        ] {
            let mut want = base.clone();
            let into = BaseTensorMut::new(Dtype::BF16, &shape, &mut want);
            match kind {
                LoraKind::Embedding => merge_embedding(into, a, b, 1.7, &opts),
                _ => merge_conv(into, a, b, 1.7, 1, &opts),
            }
            .unwrap();
            let io = super::super::apply::MemoryBlocks::new(&base);
            let streamed = StreamedBase {
                dtype: Dtype::BF16,
                shape: &shape,
                len: base.len(),
                io: &io,
                check: true,
            };
            let update = StreamedLora {
                a,
                b,
                scale: 1.7,
                kind,
                opts,
            };
            assert_eq!(stream_lora(streamed, &[update]).unwrap(), Some(true));
            assert!(io.written() == want, "{kind:?}");
        }
        // The embedding's rounding first is what makes its bits: without it they differ.
        let shape = [rows, cols];
        let mut unrounded = base.clone();
        let mut into = BaseTensorMut::new(Dtype::BF16, &shape, &mut unrounded);
        let lr = embedding_lowrank(&shape, &emb.0, &emb.1, 1.7, None).unwrap();
        apply_lowrank("embedding weight", &mut into, &lr, &opts, false).unwrap();
        let mut rounded = base.clone();
        let into = BaseTensorMut::new(Dtype::BF16, &shape, &mut rounded);
        merge_embedding(into, emb.0, emb.1, 1.7, &opts).unwrap();
        assert!(unrounded != rounded);
    }

    /// DoRA's add through the fused kernel gives the bits of `Δ` materialised and added, for
    /// row counts and widths that leave partial tiles and at offsets inside the product.
    #[test]
    fn rows_added_in_f32_by_the_fused_kernel_are_the_delta_added() {
        let vals = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k) % 257) as f32 / 97.0 - 1.3)
                .collect()
        };
        for (rows, r, n) in [(37, 16, 83), (64, 8, 256), (9, 5, 16), (130, 32, 1030)] {
            let (a, b) = (vals(r * n, 13), vals(rows * r, 29));
            let (sa, sb) = ([r, n], [rows, r]);
            let (a, b) = (F32Tensor::new(&sa, &a), F32Tensor::new(&sb, &b));
            let lr = linear_lowrank(&[rows, n], &a, &b, 0.37, false, None).unwrap();
            for (first, k) in [(0, rows), (1, rows - 1), (rows / 2, rows - rows / 2)] {
                let base = vals(k * n, 7);
                let (mut fused, mut scratch) = (base.clone(), Vec::new());
                lr.add_rows_f32("w", first, &mut fused, &mut scratch)
                    .unwrap();
                let mut d = vec![0f32; k * n];
                lr.delta_rows(first, &mut d).unwrap();
                let want: Vec<u32> = base
                    .iter()
                    .zip(&d)
                    .map(|(x, y)| (x + y).to_bits())
                    .collect();
                let got: Vec<u32> = fused.iter().map(|x| x.to_bits()).collect();
                assert!(got == want, "{rows}x{n} r{r}, rows {first}..+{k}");
                assert!(fused != base, "the delta is not zero");
            }
        }
    }

    #[test]
    fn scaling_is_f64_then_f32() {
        assert_eq!(lora_scaling(16.0, 8, false, 1.0).unwrap(), 2.0);
        assert_eq!(
            lora_scaling(16.0, 3, false, 1.0).unwrap(),
            (16.0f64 / 3.0) as f32
        );
        assert_eq!(lora_scaling(8.0, 16, true, 1.0).unwrap(), 2.0);
        assert_eq!(
            lora_scaling(7.0, 5, true, 1.0).unwrap(),
            (7.0 / 5f64.sqrt()) as f32
        );
        assert!(lora_scaling(1.0, 0, false, 1.0).is_err());
        // The weight multiplies the f64 scaling before the one rounding; weighting the f32
        // scaling would round twice (tests/fixtures/numerics/*_w0.6 pin the value peft uses).
        assert_ne!(
            lora_scaling(32.0, 6, false, 0.6).unwrap(),
            lora_scaling(32.0, 6, false, 1.0).unwrap() * 0.6f32
        );
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let a = vec![0f32; 2 * 5];
        let b = vec![0f32; 3 * 2];
        let mut w = encode_f32("w", Dtype::F32, &[0f32; 15]).unwrap();
        let opts = MergeOptions::default();
        // wrong base shape
        let err = merge_linear(
            BaseTensorMut::new(Dtype::F32, &[5, 3], &mut w),
            F32Tensor::new(&[2, 5], &a),
            F32Tensor::new(&[3, 2], &b),
            1.0,
            false,
            &opts,
        );
        assert!(
            matches!(err, Err(MergeMathError::ShapeMismatch { .. })),
            "{err:?}"
        );
        // buffer shorter than its shape
        let err = merge_linear(
            BaseTensorMut::new(Dtype::F32, &[3, 5], &mut w),
            F32Tensor::new(&[2, 6], &a),
            F32Tensor::new(&[3, 2], &b),
            1.0,
            false,
            &opts,
        );
        assert!(
            matches!(err, Err(MergeMathError::ElementCount { .. })),
            "{err:?}"
        );
        // fan_in_fan_out expects (in, out)
        assert!(merge_linear(
            BaseTensorMut::new(Dtype::F32, &[3, 5], &mut w),
            F32Tensor::new(&[2, 5], &a),
            F32Tensor::new(&[3, 2], &b),
            1.0,
            true,
            &opts,
        )
        .is_err());
        // I32 base
        assert!(merge_linear(
            BaseTensorMut::new(Dtype::I32, &[3, 5], &mut w[..60]),
            F32Tensor::new(&[2, 5], &a),
            F32Tensor::new(&[3, 2], &b),
            1.0,
            false,
            &opts,
        )
        .is_err());
        // experts: A rows not a multiple of E
        let mut we = vec![0u8; 4 * 2 * 3 * 5];
        assert!(merge_experts(
            BaseTensorMut::new(Dtype::F32, &[2, 3, 5], &mut we),
            F32Tensor::new(&[3, 5], &a[..10].repeat(2)[..15]),
            F32Tensor::new(&[3, 3], &[0.0; 9]),
            1.0,
            ExpertLayout::OutIn,
            &opts,
        )
        .is_err());
    }

    #[test]
    fn unmerge_subtracts_rounded_delta_and_safe_merge_flags_nan() {
        let a = vec![0.5f32; 2 * 4];
        let b = vec![0.25f32; 4 * 2];
        let w0: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut w = encode_f32("w", Dtype::BF16, &w0).unwrap();
        let shape = [4usize, 4];
        let opts = MergeOptions::default();
        merge_linear(
            BaseTensorMut::new(Dtype::BF16, &shape, &mut w),
            F32Tensor::new(&[2, 4], &a),
            F32Tensor::new(&[4, 2], &b),
            2.0,
            false,
            &opts,
        )
        .unwrap();
        let unm = MergeOptions {
            unmerge: true,
            ..opts
        };
        merge_linear(
            BaseTensorMut::new(Dtype::BF16, &shape, &mut w),
            F32Tensor::new(&[2, 4], &a),
            F32Tensor::new(&[4, 2], &b),
            2.0,
            false,
            &unm,
        )
        .unwrap();
        assert_eq!(decode_f32("w", Dtype::BF16, &w).unwrap(), w0);

        let mut bad_b = b.clone();
        bad_b[3] = f32::NAN;
        let safe = MergeOptions {
            safe_merge: true,
            ..opts
        };
        let err = merge_linear(
            BaseTensorMut::new(Dtype::BF16, &shape, &mut w),
            F32Tensor::new(&[2, 4], &a),
            F32Tensor::new(&[4, 2], &bad_b),
            2.0,
            false,
            &safe,
        );
        assert_eq!(
            err,
            Err(MergeMathError::NonFinite {
                what: "linear weight",
                count: 4,
                first: 4
            })
        );
    }
}
