//! The edits a plan makes to base tensors, and how each is applied to a tensor's bytes by the
//! kernels.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use peftkit_checkpoint::{CheckpointError, Dtype, Tensor};
use peftkit_peft::AdapterModule;
use std::collections::BTreeMap;

mod banded;

pub(crate) use banded::RowBanded;

use crate::kernels::FiniteProbe;
pub(crate) use crate::kernels::LoraKind;
use crate::kernels::{
    decode_f32, dora, encode_f32, lora, methods, BaseTensorMut, F32Tensor, MergeMathError,
    MergeOptions as KernelOptions, ReductionOrder,
};

/// One change to a base tensor.
#[derive(Clone)]
pub(crate) enum Edit {
    /// Replace the whole tensor (cast to the base dtype).
    Replace { source: Tensor },
    /// A LoRA pair (optionally DoRA). `round_first` rounds the delta to the base dtype before
    /// the add, as peft does for 2-D `target_parameters`.
    Lora {
        module: ModuleTensors,
        kind: LoraKind,
        scale: f32,
        dora: bool,
        round_first: bool,
    },
    /// `lora_B.bias * s` added to the base bias.
    LoraBias { bias: Tensor, scale: f32 },
    /// Rows replaced (trainable tokens).
    Rows { indices: Vec<usize>, rows: Tensor },
    /// IA3 scaling vector.
    Ia3 {
        vector: Tensor,
        feedforward: bool,
        fan_in_fan_out: bool,
    },
    /// IA3 on the bias of a non-feedforward layer.
    Ia3Bias { vector: Tensor },
    /// LoHa Hadamard product.
    Loha { module: ModuleTensors, scale: f32 },
    /// LoKr Kronecker product.
    Lokr { module: ModuleTensors, scale: f32 },
    /// LoRA on a fused 3-D expert parameter `(E, out, in)` stored as is.
    Experts { a: Tensor, b: Tensor, scale: f32 },
    /// LoRA on one expert of a fused parameter whose experts are stored per expert on disk.
    ExpertPiece(ExpertPiece),
    /// The weight of a quantized layer stored in its format and read back: peft re-quantizes
    /// a quantized layer's weight after each adapter it merges, so the next adapter starts
    /// from what the quantized weight holds (inserted between adapters by `quant`).
    Requantize(Arc<dyn Requantizer>),
}

/// A quantized layer's weight stored after one adapter's edit and read back for the next.
pub(crate) trait Requantizer: Send + Sync {
    /// What the layer holds once `values` (the weight, widened to `f32`) are stored in it: cast
    /// to the dtype it keeps, quantized and dequantized again.
    fn round_trip(
        &self,
        values: &[f32],
    ) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>>;
}

/// A module's adapter tensors by role as an edit keeps them: handles cloned out of the
/// adapter's [`AdapterModule`] view, so a plan does not borrow the adapter it was made from.
#[derive(Clone, Default)]
pub(crate) struct ModuleTensors(BTreeMap<String, Tensor>);

impl ModuleTensors {
    /// The tensors of `module`.
    pub fn of(module: &AdapterModule<'_>) -> Self {
        let roles = module
            .entries()
            .map(|(r, e)| (r.to_owned(), e.tensor.clone()));
        ModuleTensors(roles.collect())
    }

    /// The tensors given by role.
    pub fn from_roles<'t>(roles: impl IntoIterator<Item = (&'t str, &'t Tensor)>) -> Self {
        ModuleTensors(
            roles
                .into_iter()
                .map(|(r, t)| (r.to_owned(), t.clone()))
                .collect(),
        )
    }

    /// The tensor of `role`, if present.
    pub fn get(&self, role: &str) -> Option<&Tensor> {
        self.0.get(role)
    }
}

/// The delta block `rows x cols` of expert `expert` of a fused expert LoRA, for a base tensor
/// that holds that block on disk (transposed if the disk tensor is).
#[derive(Clone)]
pub(crate) struct ExpertPiece {
    pub a: Tensor,
    pub b: Tensor,
    pub experts: usize,
    pub expert: usize,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
    pub transposed: bool,
    pub scale: f32,
}

impl LoraKind {
    /// The roles of the `A` and `B` factors.
    pub(crate) fn roles(self) -> (&'static str, &'static str) {
        match self {
            LoraKind::Embedding => ("embedding_a", "embedding_b"),
            _ => ("a", "b"),
        }
    }
}

/// An edit and the adapter it comes from (whose folder its errors name).
#[derive(Clone)]
pub(crate) struct Step {
    pub adapter: Arc<Path>,
    pub edit: Edit,
}

impl Edit {
    /// Whether this edit's product `B @ A` lies outside the domain where `order` was measured
    /// to equal peft's (see [`ReductionOrder::verified`]).
    /// Whether this edit computes a low-rank (or LoHa/LoKr factor) product, whose rounding
    /// depends on the BLAS kernel peft's torch picks on the host.
    pub(crate) fn has_product(&self) -> bool {
        matches!(
            self,
            Edit::Lora { .. }
                | Edit::Experts { .. }
                | Edit::ExpertPiece { .. }
                | Edit::Loha { .. }
                | Edit::Lokr { .. }
        )
    }

    pub(crate) fn unverified(&self, order: ReductionOrder) -> bool {
        let dims = |t: Option<&Tensor>| t.map(|t| t.shape().to_vec()).unwrap_or_default();
        match self {
            Edit::Lora { module, kind, .. } => {
                let (ra, rb) = kind.roles();
                let (a, b) = (dims(module.get(ra)), dims(module.get(rb)));
                let (Some(&r), Some(&rows)) = (a.first(), b.first()) else {
                    return false;
                };
                let window = a.get(2..).map_or(1, |k| k.iter().product::<usize>());
                // Convolutions wider than 1x1 go through oneDNN, not MKL's sgemm.
                let conv = matches!(kind, LoraKind::Conv) && window > 1;
                let cols = a.get(1).copied().unwrap_or(0) * window;
                conv || !order.verified(rows, r, cols)
            }
            Edit::Experts { a, b, .. } => batched_unverified(order, a, b, 1),
            Edit::ExpertPiece(p) => batched_unverified(order, &p.a, &p.b, p.experts),
            _ => false,
        }
    }
}

/// [`Edit::unverified`] for a batched expert product of `experts` experts.
fn batched_unverified(order: ReductionOrder, a: &Tensor, b: &Tensor, experts: usize) -> bool {
    let (Some(&rows), Some(&ra), Some(&cols)) =
        (b.shape().first(), a.shape().first(), a.shape().get(1))
    else {
        return false;
    };
    let r = ra / experts.max(1);
    !order.verified_batched(rows, r, cols)
}

/// The base tensor a step edits, and the adapter its errors name.
struct Site<'a> {
    name: &'a str,
    adapter: &'a Path,
}

impl Site<'_> {
    /// A kernel's error, kept as the source of the tensor's error.
    fn math(&self, e: MergeMathError) -> CheckpointError {
        CheckpointError::TensorCompute {
            tensor: self.name.to_owned(),
            context: format!("merging {}", self.adapter.display()),
            source: Box::new(e),
        }
    }

    /// An adapter tensor widened to `f32`.
    fn f32s(&self, what: &'static str, t: &Tensor) -> Result<Vec<f32>, CheckpointError> {
        let bytes = t.bytes()?;
        decode_f32(what, t.dtype(), &bytes).map_err(|e| self.math(e))
    }

    /// An adapter tensor of `module` widened to `f32`, with its shape.
    fn role(&self, module: &ModuleTensors, role: &'static str) -> Result<Loaded, CheckpointError> {
        match module.get(role) {
            Some(t) => Ok(Some((self.f32s(role, t)?, t.shape().to_vec()))),
            None => Ok(None),
        }
    }

    /// A tensor the plan guarantees, missing: an internal invariant broken.
    fn missing(&self, reason: impl Into<String>) -> CheckpointError {
        CheckpointError::TensorData {
            tensor: self.name.into(),
            reason: reason.into(),
        }
    }
}

/// A decoded adapter tensor and its shape, if the module has it.
type Loaded = Option<(Vec<f32>, Vec<usize>)>;

impl Step {
    /// Applies this step to `data`, the bytes of base tensor `name` (`dtype`, `shape`). A
    /// kernel that checks its output as it writes it tells `probe` what it found (see
    /// [`FiniteProbe`]); others leave it as it was.
    pub(crate) fn apply(
        &self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        data: &mut [u8],
        opts: &KernelOptions,
        probe: Option<&FiniteProbe>,
    ) -> Result<(), CheckpointError> {
        let site = Site {
            name,
            adapter: &self.adapter,
        };
        if let Edit::Replace { source } = &self.edit {
            let values = site.f32s("replacement", source)?;
            let bytes = encode_f32("replacement", dtype, &values).map_err(|e| site.math(e))?;
            if bytes.len() != data.len() {
                return Err(site.missing(format!(
                    "replacement of {} bytes for a tensor of {}",
                    bytes.len(),
                    data.len()
                )));
            }
            data.copy_from_slice(&bytes);
            return Ok(());
        }
        if let Edit::Requantize(q) = &self.edit {
            let values = decode_f32("weight", dtype, data).map_err(|e| site.math(e))?;
            let values =
                q.round_trip(&values)
                    .map_err(|source| CheckpointError::TensorCompute {
                        tensor: name.to_owned(),
                        context: format!("re-quantizing after merging {}", site.adapter.display()),
                        source,
                    })?;
            // The round trip keeps the shape: the bytes are the same length, written in place.
            let bytes = encode_f32("weight", dtype, &values).map_err(|e| site.math(e))?;
            if bytes.len() != data.len() {
                return Err(site.missing("a re-quantized weight of another size"));
            }
            data.copy_from_slice(&bytes);
            return Ok(());
        }
        let base = BaseTensorMut::new(dtype, shape, data);
        let base = match probe {
            Some(p) => base.with_probe(p),
            None => base,
        };
        let opts = *opts;
        let vector = |what, t: &Tensor| -> Result<(Vec<f32>, Vec<usize>), CheckpointError> {
            Ok((site.f32s(what, t)?, t.shape().to_vec()))
        };
        let done = match &self.edit {
            Edit::Replace { .. } | Edit::Requantize(_) => unreachable!("handled above"),
            Edit::Lora {
                module,
                kind,
                scale,
                dora,
                round_first,
            } => {
                let opts = KernelOptions {
                    round_delta_first: opts.round_delta_first || *round_first,
                    ..opts
                };
                return apply_lora(&site, base, module, *kind, *scale, *dora, &opts);
            }
            Edit::LoraBias { bias, scale } => {
                let (v, s) = vector("lora_B.bias", bias)?;
                lora::merge_lora_bias(base, F32Tensor::new(&s, &v), *scale, &opts)
            }
            Edit::Rows { indices, rows } => {
                let (v, s) = vector("trainable_tokens_delta", rows)?;
                methods::replace_rows(base, indices, F32Tensor::new(&s, &v))
            }
            Edit::Ia3 {
                vector: t,
                feedforward,
                fan_in_fan_out,
            } => {
                let (v, s) = vector("ia3_l", t)?;
                let l = F32Tensor::new(&s, &v);
                methods::merge_ia3_weight(base, l, *feedforward, *fan_in_fan_out, 1, &opts)
            }
            Edit::Ia3Bias { vector: t } => {
                let (v, s) = vector("ia3_l", t)?;
                methods::merge_ia3_bias(base, F32Tensor::new(&s, &v), &opts)
            }
            Edit::Loha { module, scale } => return apply_loha(&site, base, module, *scale, &opts),
            Edit::Lokr { module, scale } => return apply_lokr(&site, base, module, *scale, &opts),
            Edit::Experts { a, b, scale } => {
                let ((va, sa), (vb, sb)) = (vector("lora_A", a)?, vector("lora_B", b)?);
                let (a, b) = (F32Tensor::new(&sa, &va), F32Tensor::new(&sb, &vb));
                let layout = lora::ExpertLayout::OutIn;
                lora::merge_experts(base, a, b, *scale, layout, &opts)
            }
            Edit::ExpertPiece(piece) => return apply_expert_piece(&site, base, piece, &opts),
        };
        done.map_err(|e| site.math(e))
    }
}

/// A LoRA (or DoRA) pair into a Linear, Embedding or Conv weight.
fn apply_lora(
    site: &Site<'_>,
    base: BaseTensorMut<'_>,
    module: &ModuleTensors,
    kind: LoraKind,
    scale: f32,
    use_dora: bool,
    opts: &KernelOptions,
) -> Result<(), CheckpointError> {
    let pair = LoraPair::read(site, module, kind)?;
    let (a, b) = pair.tensors();
    let done = if use_dora {
        let mt = module
            .get("magnitude")
            .ok_or_else(|| site.missing("DoRA magnitude missing"))?;
        let m = site.f32s("lora_magnitude_vector", mt)?;
        let m = F32Tensor::new(mt.shape(), &m);
        match kind {
            LoraKind::Linear { fan_in_fan_out } => {
                dora::merge_dora_linear(base, a, b, m, scale, fan_in_fan_out, opts)
            }
            LoraKind::Embedding => dora::merge_dora_embedding(base, a, b, m, scale, opts),
            LoraKind::Conv => dora::merge_dora_conv(base, a, b, m, scale, 1, opts),
        }
    } else {
        match kind {
            LoraKind::Linear { fan_in_fan_out } => {
                lora::merge_linear(base, a, b, scale, fan_in_fan_out, opts)
            }
            LoraKind::Embedding => lora::merge_embedding(base, a, b, scale, opts),
            LoraKind::Conv => lora::merge_conv(base, a, b, scale, 1, opts),
        }
    };
    done.map_err(|e| site.math(e))
}

/// Applies `steps`, in order, to a base tensor (`name`) that is in no buffer, streaming it
/// through `base.io` block by block, when every step is a plain LoRA merge (Linear, Embedding
/// or Conv) with a fused kernel (see [`lora::stream_lora`]) or, with a DoRA among them, when
/// every step runs by bands of rows (see [`RowBanded`]) or the one step is a DoRA whose norm
/// runs over columns (see `banded::stream_column_dora`). `Ok(None)`, having read and written
/// nothing, otherwise; else whether every merged value is finite (when `base.check`).
pub(crate) fn stream_steps(
    steps: &[Step],
    name: &str,
    base: lora::StreamedBase<'_>,
    opts: &KernelOptions,
) -> Result<Option<bool>, CheckpointError> {
    if steps
        .iter()
        .any(|s| matches!(s.edit, Edit::Lora { dora: true, .. }))
    {
        if let Some(done) = banded::stream_banded(steps, name, base, opts)? {
            return Ok(Some(done));
        }
        return banded::stream_column_dora(steps, name, base, opts);
    }
    let mut pairs = Vec::with_capacity(steps.len());
    for step in steps {
        let Edit::Lora {
            module,
            kind,
            scale,
            dora: false,
            round_first,
        } = &step.edit
        else {
            return Ok(None);
        };
        let site = Site {
            name,
            adapter: &step.adapter,
        };
        let opts = KernelOptions {
            round_delta_first: opts.round_delta_first || *round_first,
            ..*opts
        };
        let pair = LoraPair::read(&site, module, *kind)?;
        pairs.push((pair, *scale, *kind, opts));
    }
    let chain: Vec<lora::StreamedLora<'_>> = pairs
        .iter()
        .map(|(pair, scale, kind, opts)| {
            let (a, b) = pair.tensors();
            lora::StreamedLora {
                a,
                b,
                scale: *scale,
                kind: *kind,
                opts: *opts,
            }
        })
        .collect();
    // Shapes were checked when planning: an error here is the base's IO or a broken invariant,
    // reported against the last adapter.
    let Some(last) = steps.last() else {
        return Ok(None);
    };
    let site = Site {
        name,
        adapter: &last.adapter,
    };
    lora::stream_lora(base, &chain).map_err(|e| site.math(e))
}

/// A LoRA module's `lora_A` and `lora_B` tensors, widened to `f32`.
struct LoraPair<'m> {
    a: (&'m Tensor, Vec<f32>),
    b: (&'m Tensor, Vec<f32>),
}

impl<'m> LoraPair<'m> {
    /// Reads the pair of `module` by `kind`'s role names.
    fn read(
        site: &Site<'_>,
        module: &'m ModuleTensors,
        kind: LoraKind,
    ) -> Result<Self, CheckpointError> {
        let (ra, rb) = kind.roles();
        let (Some(ta), Some(tb)) = (module.get(ra), module.get(rb)) else {
            return Err(site.missing("incomplete LoRA pair"));
        };
        Ok(LoraPair {
            a: (ta, site.f32s("lora_A", ta)?),
            b: (tb, site.f32s("lora_B", tb)?),
        })
    }

    /// `(lora_A, lora_B)` as the kernels take them.
    fn tensors(&self) -> (F32Tensor<'_>, F32Tensor<'_>) {
        (
            F32Tensor::new(self.a.0.shape(), &self.a.1),
            F32Tensor::new(self.b.0.shape(), &self.b.1),
        )
    }
}

/// A LoHa module: the Hadamard product of two low-rank products.
fn apply_loha(
    site: &Site<'_>,
    base: BaseTensorMut<'_>,
    module: &ModuleTensors,
    scale: f32,
    opts: &KernelOptions,
) -> Result<(), CheckpointError> {
    let get = |role: &'static str| {
        site.role(module, role)?
            .ok_or_else(|| site.missing(format!("LoHa tensor {role} missing")))
    };
    let (w1a, s1a) = get("w1_a")?;
    let (w1b, s1b) = get("w1_b")?;
    let (w2a, s2a) = get("w2_a")?;
    let (w2b, s2b) = get("w2_b")?;
    methods::merge_loha(
        base,
        F32Tensor::new(&s1a, &w1a),
        F32Tensor::new(&s1b, &w1b),
        F32Tensor::new(&s2a, &w2a),
        F32Tensor::new(&s2b, &w2b),
        scale,
        opts,
    )
    .map_err(|e| site.math(e))
}

/// A LoKr module: the Kronecker product of two factors, each full or a low-rank product.
fn apply_lokr(
    site: &Site<'_>,
    base: BaseTensorMut<'_>,
    module: &ModuleTensors,
    scale: f32,
    opts: &KernelOptions,
) -> Result<(), CheckpointError> {
    let load = |role| site.role(module, role);
    let (w1, w1a, w1b) = (load("w1")?, load("w1_a")?, load("w1_b")?);
    let (w2, w2a, w2b) = (load("w2")?, load("w2_a")?, load("w2_b")?);
    let f1 = lokr_factor(site, &w1, &w1a, &w1b)?;
    let f2 = lokr_factor(site, &w2, &w2a, &w2b)?;
    methods::merge_lokr(base, f1, f2, scale, opts).map_err(|e| site.math(e))
}

/// A LoKr factor: the full matrix, or the product of its two halves.
fn lokr_factor<'a>(
    site: &Site<'_>,
    full: &'a Loaded,
    a: &'a Loaded,
    b: &'a Loaded,
) -> Result<methods::LokrFactor<'a>, CheckpointError> {
    match (full, a, b) {
        (Some((v, s)), _, _) => Ok(methods::LokrFactor::Full(F32Tensor::new(s, v))),
        (None, Some((va, sa)), Some((vb, sb))) => Ok(methods::LokrFactor::Product(
            F32Tensor::new(sa, va),
            F32Tensor::new(sb, vb),
        )),
        _ => Err(site.missing("LoKr factors incomplete")),
    }
}

/// One expert's block of a fused expert LoRA into the per-expert tensor on disk.
fn apply_expert_piece(
    site: &Site<'_>,
    base: BaseTensorMut<'_>,
    p: &ExpertPiece,
    opts: &KernelOptions,
) -> Result<(), CheckpointError> {
    let (r, a_e, b_e) = expert_piece_factors(site, p)?;
    let (nr, nc) = (p.rows.len(), p.cols.len());
    // peft rounds the expert delta to the parameter dtype before adding it. A transposed
    // disk tensor holds Δᵀ, which is the Linear kernel's `fan_in_fan_out` layout.
    let opts = KernelOptions {
        round_delta_first: true,
        ..*opts
    };
    lora::merge_linear(
        base,
        F32Tensor::new(&[r, nc], &a_e),
        F32Tensor::new(&[nr, r], &b_e),
        p.scale,
        p.transposed,
        &opts,
    )
    .map_err(|e| site.math(e))
}

/// The LoRA factors of one expert's block of a fused parameter: `(r, A_e (r × cols), B_e
/// (rows × r))`. `A` is `(r·E, in)` with expert-major rows, `B` is `(out, r·E)` with
/// rank-major columns (peft's `ParamWrapper` layout).
fn expert_piece_factors(
    site: &Site<'_>,
    p: &ExpertPiece,
) -> Result<(usize, Vec<f32>, Vec<f32>), CheckpointError> {
    let (va, vb) = (site.f32s("lora_A", &p.a)?, site.f32s("lora_B", &p.b)?);
    let (re, inf) = (p.a.shape()[0], p.a.shape()[1]);
    let (out, re_b) = (p.b.shape()[0], p.b.shape()[1]);
    let (experts, expert) = (p.experts, p.expert);
    if re != re_b || experts == 0 || re % experts != 0 || p.rows.end > out || p.cols.end > inf {
        return Err(site.missing(format!(
            "expert LoRA shapes {:?} / {:?} do not fit {experts} experts",
            p.a.shape(),
            p.b.shape()
        )));
    }
    let r = re / experts;
    let cols = &p.cols;
    let a_e: Vec<f32> = (0..r)
        .flat_map(|k| {
            va[(expert * r + k) * inf + cols.start..(expert * r + k) * inf + cols.end]
                .iter()
                .copied()
        })
        .collect();
    let b_e: Vec<f32> = p
        .rows
        .clone()
        .flat_map(|o| (0..r).map(move |k| (o, k)))
        .map(|(o, k)| vb[o * re + k * experts + expert])
        .collect();
    Ok((r, a_e, b_e))
}
