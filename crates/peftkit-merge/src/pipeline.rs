//! The streaming merge: adapters merged into a base checkpoint tensor by tensor.
//!
//! The base is opened by its headers only. Every output tensor is a lazy
//! [`peftkit_checkpoint::Tensor`]: untouched tensors are streamed from the base file without
//! being decoded; a targeted tensor is read, merged in place by the kernels of
//! [`crate::merge`] (which use every core), encoded back to the base dtype and dropped once
//! written. Peak memory is a few tensors, whatever the size of the model.
//!
//! Everything that can be checked before writing is checked first (every adapter tensor has a
//! base tensor, shapes agree, the method and its options can be merged); what can only fail
//! while computing (a NaN with `safe_merge`) aborts the atomic save, so the output folder
//! either holds the complete merge or is left as it was.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indexmap::IndexMap;
use peftkit_checkpoint::companion::companion_files;
use peftkit_checkpoint::{
    plan_save, save_planned, Checkpoint, CheckpointError, Dtype, ModelConfig, SaveOptions,
    SavePlan, StateDict, Tensor,
};
use serde::Serialize;

use peftkit_peft::adapter::{Adapter, AdapterError, AdapterModule};
use peftkit_peft::config::{AdapterConfig, TrainableTokenIndices};
use crate::kernels::dtype::decode_f32;
use crate::kernels::{
    dora, exact, host_order, lora, methods, reduction_order, BaseTensorMut, F32Tensor,
    MergeMathError, MergeOptions as KernelOptions, Numerics, ReductionOrder, UnknownOrder,
    UNVERIFIED_BOUND_ULP,
};
use peftkit_peft::targeting::PatternResolver;

/// One adapter to merge and its weight (`--adapter DIR[:WEIGHT]`).
#[derive(Debug, Clone)]
pub struct AdapterInput {
    /// The adapter folder.
    pub dir: PathBuf,
    /// Multiplies the adapter's scaling (1.0 = as trained).
    pub weight: f64,
}

impl AdapterInput {
    /// Parses `DIR` or `DIR:WEIGHT`. A suffix that is not a number is part of the path.
    pub fn parse(arg: &str) -> Self {
        if let Some((dir, w)) = arg.rsplit_once(':') {
            if let Ok(weight) = w.parse::<f64>() {
                return AdapterInput {
                    dir: dir.into(),
                    weight,
                };
            }
        }
        AdapterInput {
            dir: arg.into(),
            weight: 1.0,
        }
    }
}

/// What to merge and where.
///
/// [`MergeJob::new`] fills in the defaults (peft's numerics, base layout kept, synced output);
/// set the other fields on the result.
///
/// ```
/// use peftkit_merge::Numerics;
/// use peftkit_merge::{AdapterInput, MergeJob};
///
/// let job = MergeJob {
///     numerics: Numerics::Exact,
///     ..MergeJob::new("base", vec![AdapterInput::parse("adapter:0.5")], "out")
/// };
/// assert_eq!(job.adapters[0].weight, 0.5);
/// assert!(!job.safe_merge && job.durable && job.max_shard_size.is_none());
/// ```
#[derive(Debug, Clone)]
pub struct MergeJob {
    /// The base checkpoint folder (or `.safetensors` file).
    pub base: PathBuf,
    /// Adapters, merged in this order, each onto the result of the previous.
    pub adapters: Vec<AdapterInput>,
    /// Output folder (created, or replaced atomically).
    pub out: PathBuf,
    /// `None` keeps the base layout (same files, same index); `Some` reshards.
    pub max_shard_size: Option<u64>,
    /// peft's `safe_merge=True`: round the delta first and refuse NaN/Inf results.
    pub safe_merge: bool,
    /// Subtract the adapters instead (peft's `unmerge`: `W -= Δ.to(W.dtype)`), to recover a
    /// base from a merged checkpoint. Exact in f32 up to rounding; not an exact inverse in 16
    /// bits. Adapters that replace tensors cannot be unmerged.
    pub unmerge: bool,
    /// Sync the output to disk before it is swapped in (see
    /// [`peftkit_checkpoint::SaveOptions::durable`]).
    pub durable: bool,
    /// peft's arithmetic, or one correct rounding identical on every machine
    /// ([`crate::kernels::exact`]; DoRA, LoHa, LoKr and IA3 unmerges are refused there).
    pub numerics: Numerics,
}

impl MergeJob {
    /// A merge of `adapters` (in order) into `base`, written to `out`, with the defaults: the
    /// base layout kept, no safe merge, no unmerge, synced output, [`Numerics::Peft`].
    pub fn new(
        base: impl Into<PathBuf>,
        adapters: Vec<AdapterInput>,
        out: impl Into<PathBuf>,
    ) -> Self {
        MergeJob {
            base: base.into(),
            adapters,
            out: out.into(),
            max_shard_size: None,
            safe_merge: false,
            unmerge: false,
            durable: true,
            numerics: Numerics::default(),
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MergeSummary {
    /// Base tensors changed by an adapter.
    pub tensors_merged: usize,
    /// Base tensors replaced whole (`modules_to_save`, saved embeddings).
    pub tensors_replaced: usize,
    /// Base tensors copied unchanged.
    pub tensors_copied: usize,
    /// Tensors added (an untied `lm_head`).
    pub tensors_added: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Weight files written.
    pub files: Vec<String>,
    /// Whether `tie_word_embeddings` was set to false.
    pub untied_embeddings: bool,
    /// How the merged floats were computed.
    pub numerics: NumericsReport,
    /// Wall time.
    pub seconds: f64,
}

/// The reduction order a merge used, and which tensors it could not promise bit for bit.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NumericsReport {
    /// `peft` (peft's arithmetic on this host) or `exact` (correctly rounded, the same bytes on
    /// every host).
    pub mode: Numerics,
    /// MKL's order reproduced for `B @ A` (the host's, unless overridden; unused by `exact`).
    pub reduction_order: ReductionOrder,
    /// Whether this host's CPU family was measured (if not, the nearest family's order is used).
    pub host_measured: bool,
    /// Base tensors whose delta includes a product outside the order's verified domain (tiny
    /// or very high-rank products, batched expert products narrower than 12, convolutions
    /// wider than 1x1): they agree with peft on this host to [`Self::unverified_bound_ulp`].
    pub unverified_tensors: Vec<String>,
    /// The bound for those, in units in the last place of the tensor's largest element.
    pub unverified_bound_ulp: u32,
}

/// Why a merge was refused or failed. Nothing is written in any of these cases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// An adapter could not be loaded.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The base could not be read or the output written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// `PEFTKIT_REDUCTION_ORDER` names no known order.
    #[error(transparent)]
    Order(#[from] UnknownOrder),
    /// An adapter tensor whose module has no tensor in the base.
    #[error("{adapter}: `{key}` adapts `{module}`, but the base {base} has no tensor `{expected}`; the adapter was trained on another model or its names need remapping")]
    NoBaseTensor {
        /// Adapter folder.
        adapter: PathBuf,
        /// Adapter tensor key.
        key: String,
        /// Module path.
        module: String,
        /// Base key looked for.
        expected: String,
        /// Base folder.
        base: PathBuf,
    },
    /// A method, variant or option that cannot be merged (exactly).
    #[error("{adapter}: cannot merge: {what}")]
    Unsupported {
        /// Adapter folder.
        adapter: PathBuf,
        /// What is unsupported.
        what: String,
    },
    /// The base's conversion table does not fit its tensors (a resharded merge plans on the
    /// transformers-v5 layout).
    #[error(transparent)]
    Remap(#[from] peftkit_remap::RemapError),
    /// Adapter and base shapes disagree.
    #[error("{adapter}: `{key}` has shape {adapter_shape:?}, which does not fit base tensor `{base_key}` {base_shape:?}")]
    Shape {
        /// Adapter folder.
        adapter: PathBuf,
        /// Adapter tensor key.
        key: String,
        /// Its shape.
        adapter_shape: Vec<usize>,
        /// Base tensor.
        base_key: String,
        /// Its shape.
        base_shape: Vec<usize>,
    },
}

fn math_error(tensor: &str, adapter: &Path, e: MergeMathError) -> CheckpointError {
    CheckpointError::TensorData {
        tensor: tensor.to_owned(),
        reason: format!("merging {}: {e}", adapter.display()),
    }
}

/// One change to a base tensor.
#[derive(Clone)]
enum Edit {
    /// Replace the whole tensor (cast to the base dtype).
    Replace { source: Tensor },
    /// A LoRA pair (optionally DoRA).
    /// A LoRA pair (optionally DoRA). `round_first` rounds the delta to the base dtype before
    /// the add, as peft does for 2-D `target_parameters`.
    Lora {
        module: AdapterModule,
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
    Loha { module: AdapterModule, scale: f32 },
    /// LoKr Kronecker product.
    Lokr { module: AdapterModule, scale: f32 },
    /// LoRA on a fused 3-D expert parameter `(E, out, in)` stored as is.
    Experts { a: Tensor, b: Tensor, scale: f32 },
    /// LoRA on one expert of a fused parameter whose experts are stored per expert on disk:
    /// the delta block `rows x cols` of expert `expert` (transposed if the disk tensor is).
    ExpertPiece {
        a: Tensor,
        b: Tensor,
        experts: usize,
        expert: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        transposed: bool,
        scale: f32,
    },
}

#[derive(Clone, Copy, Debug)]
enum LoraKind {
    Linear { fan_in_fan_out: bool },
    Embedding,
    Conv,
}

#[derive(Clone)]
struct Step {
    adapter: Arc<Path>,
    edit: Edit,
}

impl Edit {
    /// Whether this edit's product `B @ A` lies outside the domain where `order` was measured
    /// to equal peft's (see [`ReductionOrder::verified`]).
    fn unverified(&self, order: ReductionOrder) -> bool {
        let dims = |t: Option<&Tensor>| t.map(|t| t.shape().to_vec()).unwrap_or_default();
        match self {
            Edit::Lora { module, kind, .. } => {
                let (a, b) = match kind {
                    LoraKind::Embedding => (
                        dims(module.get("embedding_a")),
                        dims(module.get("embedding_b")),
                    ),
                    _ => (dims(module.get("a")), dims(module.get("b"))),
                };
                let (Some(&r), Some(&rows)) = (a.first(), b.first()) else {
                    return false;
                };
                let window = a.get(2..).map_or(1, |k| k.iter().product::<usize>());
                // Convolutions wider than 1x1 go through oneDNN, not MKL's sgemm.
                let conv = matches!(kind, LoraKind::Conv) && window > 1;
                let cols = a.get(1).copied().unwrap_or(0) * window;
                conv || !order.verified(rows, r, cols)
            }
            Edit::Experts { a, b, .. } | Edit::ExpertPiece { a, b, .. } => {
                let (rows, cols) = (dims(Some(b)), dims(Some(a)));
                let (Some(&rows), Some(&ra), Some(&cols)) =
                    (rows.first(), cols.first(), cols.get(1))
                else {
                    return false;
                };
                let experts = match self {
                    Edit::ExpertPiece { experts, .. } => *experts,
                    _ => 1,
                };
                let r = ra / experts.max(1);
                !order.verified_batched(rows, r, cols)
            }
            _ => false,
        }
    }
}

fn f32s(
    what: &'static str,
    t: &Tensor,
    tensor: &str,
    adapter: &Path,
) -> Result<Vec<f32>, CheckpointError> {
    let bytes = t.bytes()?;
    decode_f32(what, t.dtype(), &bytes).map_err(|e| math_error(tensor, adapter, e))
}

fn apply(
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    data: &mut Vec<u8>,
    step: &Step,
    opts: &KernelOptions,
) -> Result<(), CheckpointError> {
    let adapter: &Path = &step.adapter;
    let err = |e: MergeMathError| math_error(name, adapter, e);
    let opts = *opts;
    match &step.edit {
        Edit::Replace { source } => {
            let values = f32s("replacement", source, name, adapter)?;
            *data = crate::kernels::dtype::encode_f32("replacement", dtype, &values).map_err(err)?;
            Ok(())
        }
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
            let (ra, rb) = match kind {
                LoraKind::Embedding => ("embedding_a", "embedding_b"),
                _ => ("a", "b"),
            };
            let (ta, tb) = (module.get(ra), module.get(rb));
            let (Some(ta), Some(tb)) = (ta, tb) else {
                return Err(CheckpointError::TensorData {
                    tensor: name.into(),
                    reason: "incomplete LoRA pair".into(),
                });
            };
            let (a, b) = (
                f32s("lora_A", ta, name, adapter)?,
                f32s("lora_B", tb, name, adapter)?,
            );
            let (a, b) = (
                F32Tensor::new(ta.shape(), &a),
                F32Tensor::new(tb.shape(), &b),
            );
            let base = BaseTensorMut::new(dtype, shape, data);
            if *dora {
                let mt = module
                    .get("magnitude")
                    .ok_or_else(|| CheckpointError::TensorData {
                        tensor: name.into(),
                        reason: "DoRA magnitude missing".into(),
                    })?;
                let m = f32s("lora_magnitude_vector", mt, name, adapter)?;
                let m = F32Tensor::new(mt.shape(), &m);
                return match kind {
                    LoraKind::Linear { fan_in_fan_out } => {
                        dora::merge_dora_linear(base, a, b, m, *scale, *fan_in_fan_out, &opts)
                    }
                    LoraKind::Embedding => dora::merge_dora_embedding(base, a, b, m, *scale, &opts),
                    LoraKind::Conv => dora::merge_dora_conv(base, a, b, m, *scale, 1, &opts),
                }
                .map_err(err);
            }
            match kind {
                LoraKind::Linear { fan_in_fan_out } => {
                    lora::merge_linear(base, a, b, *scale, *fan_in_fan_out, &opts)
                }
                LoraKind::Embedding => lora::merge_embedding(base, a, b, *scale, &opts),
                LoraKind::Conv => lora::merge_conv(base, a, b, *scale, 1, &opts),
            }
            .map_err(err)
        }
        Edit::LoraBias { bias, scale } => {
            let v = f32s("lora_B.bias", bias, name, adapter)?;
            lora::merge_lora_bias(
                BaseTensorMut::new(dtype, shape, data),
                F32Tensor::new(bias.shape(), &v),
                *scale,
                &opts,
            )
            .map_err(err)
        }
        Edit::Rows { indices, rows } => {
            let v = f32s("trainable_tokens_delta", rows, name, adapter)?;
            methods::replace_rows(
                BaseTensorMut::new(dtype, shape, data),
                indices,
                F32Tensor::new(rows.shape(), &v),
            )
            .map_err(err)
        }
        Edit::Ia3 {
            vector,
            feedforward,
            fan_in_fan_out,
        } => {
            let v = f32s("ia3_l", vector, name, adapter)?;
            methods::merge_ia3_weight(
                BaseTensorMut::new(dtype, shape, data),
                F32Tensor::new(vector.shape(), &v),
                *feedforward,
                *fan_in_fan_out,
                1,
                &opts,
            )
            .map_err(err)
        }
        Edit::Ia3Bias { vector } => {
            let v = f32s("ia3_l", vector, name, adapter)?;
            methods::merge_ia3_bias(
                BaseTensorMut::new(dtype, shape, data),
                F32Tensor::new(vector.shape(), &v),
                &opts,
            )
            .map_err(err)
        }
        Edit::Loha { module, scale } => {
            let get = |role: &'static str| -> Result<(Vec<f32>, Vec<usize>), CheckpointError> {
                let t = module
                    .get(role)
                    .ok_or_else(|| CheckpointError::TensorData {
                        tensor: name.into(),
                        reason: format!("LoHa tensor {role} missing"),
                    })?;
                Ok((f32s(role, t, name, adapter)?, t.shape().to_vec()))
            };
            let (w1a, s1a) = get("w1_a")?;
            let (w1b, s1b) = get("w1_b")?;
            let (w2a, s2a) = get("w2_a")?;
            let (w2b, s2b) = get("w2_b")?;
            methods::merge_loha(
                BaseTensorMut::new(dtype, shape, data),
                F32Tensor::new(&s1a, &w1a),
                F32Tensor::new(&s1b, &w1b),
                F32Tensor::new(&s2a, &w2a),
                F32Tensor::new(&s2b, &w2b),
                *scale,
                &opts,
            )
            .map_err(err)
        }
        Edit::Experts { a, b, scale } => {
            let (va, vb) = (
                f32s("lora_A", a, name, adapter)?,
                f32s("lora_B", b, name, adapter)?,
            );
            lora::merge_experts(
                BaseTensorMut::new(dtype, shape, data),
                F32Tensor::new(a.shape(), &va),
                F32Tensor::new(b.shape(), &vb),
                *scale,
                lora::ExpertLayout::OutIn,
                &opts,
            )
            .map_err(err)
        }
        Edit::ExpertPiece {
            a,
            b,
            experts,
            expert,
            rows,
            cols,
            transposed,
            scale,
        } => {
            let (r, a_e, b_e) =
                expert_piece_factors(name, adapter, a, b, *experts, *expert, rows, cols)?;
            let (nr, nc) = (rows.len(), cols.len());
            // peft rounds the expert delta to the parameter dtype before adding it. A transposed
            // disk tensor holds Δᵀ, which is the Linear kernel's `fan_in_fan_out` layout.
            let opts = KernelOptions {
                round_delta_first: true,
                ..opts
            };
            lora::merge_linear(
                BaseTensorMut::new(dtype, shape, data),
                F32Tensor::new(&[r, nc], &a_e),
                F32Tensor::new(&[nr, r], &b_e),
                *scale,
                *transposed,
                &opts,
            )
            .map_err(err)
        }
        Edit::Lokr { module, scale } => {
            let load = |role: &'static str| -> Result<Loaded, CheckpointError> {
                match module.get(role) {
                    Some(t) => Ok(Some((f32s(role, t, name, adapter)?, t.shape().to_vec()))),
                    None => Ok(None),
                }
            };
            let (w1, w1a, w1b) = (load("w1")?, load("w1_a")?, load("w1_b")?);
            let (w2, w2a, w2b) = (load("w2")?, load("w2_a")?, load("w2_b")?);
            let f1 = lokr_factor(name, &w1, &w1a, &w1b)?;
            let f2 = lokr_factor(name, &w2, &w2a, &w2b)?;
            methods::merge_lokr(
                BaseTensorMut::new(dtype, shape, data),
                f1,
                f2,
                *scale,
                &opts,
            )
            .map_err(err)
        }
    }
}

/// The LoRA factors of one expert's block of a fused parameter: `(r, A_e (r × cols), B_e
/// (rows × r))`. `A` is `(r·E, in)` with expert-major rows, `B` is `(out, r·E)` with rank-major columns
/// (peft's `ParamWrapper` layout).
#[allow(clippy::too_many_arguments)]
fn expert_piece_factors(
    name: &str,
    adapter: &Path,
    a: &Tensor,
    b: &Tensor,
    experts: usize,
    expert: usize,
    rows: &Range<usize>,
    cols: &Range<usize>,
) -> Result<(usize, Vec<f32>, Vec<f32>), CheckpointError> {
    let (va, vb) = (
        f32s("lora_A", a, name, adapter)?,
        f32s("lora_B", b, name, adapter)?,
    );
    let (re, inf) = (a.shape()[0], a.shape()[1]);
    let (out, re_b) = (b.shape()[0], b.shape()[1]);
    if re != re_b || experts == 0 || re % experts != 0 || rows.end > out || cols.end > inf {
        return Err(CheckpointError::TensorData {
            tensor: name.into(),
            reason: format!(
                "expert LoRA shapes {:?} / {:?} do not fit {experts} experts",
                a.shape(),
                b.shape()
            ),
        });
    }
    let r = re / experts;
    let a_e: Vec<f32> = (0..r)
        .flat_map(|k| {
            va[(expert * r + k) * inf + cols.start..(expert * r + k) * inf + cols.end]
                .iter()
                .copied()
        })
        .collect();
    let b_e: Vec<f32> = rows
        .clone()
        .flat_map(|o| (0..r).map(move |k| (o, k)))
        .map(|(o, k)| vb[o * re + k * experts + expert])
        .collect();
    Ok((r, a_e, b_e))
}

/// A decoded adapter tensor and its shape, if the module has it.
type Loaded = Option<(Vec<f32>, Vec<usize>)>;

/// A LoKr factor: the full matrix, or the product of its two halves.
fn lokr_factor<'a>(
    name: &str,
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
        _ => Err(CheckpointError::TensorData {
            tensor: name.into(),
            reason: "LoKr factors incomplete".into(),
        }),
    }
}

/// Everything decided before any byte is written.
struct MergePlan {
    steps: IndexMap<String, Vec<Step>>,
    added: IndexMap<String, (Tensor, String)>,
    untie: bool,
}

fn numerics_report(plan: &MergePlan, order: ReductionOrder, mode: Numerics) -> NumericsReport {
    // Exact numerics do not depend on the host: nothing is left unverified.
    let unverified_tensors = match mode {
        Numerics::Exact => vec![],
        Numerics::Peft => plan
            .steps
            .iter()
            .filter(|(_, steps)| steps.iter().any(|s| s.edit.unverified(order)))
            .map(|(name, _)| name.clone())
            .collect(),
    };
    NumericsReport {
        mode,
        reduction_order: order,
        host_measured: host_order().measured,
        unverified_tensors,
        unverified_bound_ulp: UNVERIFIED_BOUND_ULP,
    }
}

/// The scale of one adapter layer: [`lora::lora_scaling`] with the adapter's merge weight.
fn scale_of(
    alpha: f64,
    r: usize,
    rslora: bool,
    weight: f64,
    adapter: &Path,
) -> Result<f32, MergeError> {
    lora::lora_scaling(alpha, r, rslora, weight).map_err(|e| MergeError::Unsupported {
        adapter: adapter.to_owned(),
        what: e.to_string(),
    })
}

fn number(v: Option<&serde_json::Value>) -> Option<f64> {
    v.and_then(serde_json::Value::as_f64)
}

/// Removes the `.base_layer` levels peft adds when it wraps one module several times.
fn strip_base_layers(mut path: &str) -> &str {
    while let Some(p) = path.strip_suffix(".base_layer") {
        path = p;
    }
    path
}

/// The on-disk name of a base tensor an adapter names in transformers-v5 module naming
/// (`model.language_model.layers.0…` for Llava, `mlp.gate` for Mixtral's router), through the
/// base's conversion table. Only one-to-one renames qualify; fused parameters are split per
/// expert elsewhere.
fn on_disk_name(
    mapping: &peftkit_remap::Mapping,
    v5_name: &str,
    base: &Checkpoint,
) -> Option<String> {
    let probe = Tensor::lazy(Dtype::U8, vec![0], || Ok(Vec::new())).ok()?;
    let single: StateDict = [(v5_name.to_owned(), probe)].into_iter().collect();
    let reversed = mapping
        .reverse(&single, &peftkit_remap::Revert::AllTableRules)
        .ok()?;
    let mut names = reversed.keys();
    match (names.next(), names.next()) {
        (Some(name), None) if name != v5_name && base.get(name).is_some() => Some(name.clone()),
        _ => None,
    }
}

/// A LoRA on a 2-D module parameter (peft's `ParamWrapper`): like a Linear, but peft rounds
/// the delta to the parameter's dtype before adding it.
fn router_edit(a: &Tensor, b: &Tensor, scale: f32) -> Edit {
    let tensor = |t: &Tensor| peftkit_peft::adapter::AdapterTensor {
        key: String::new(),
        tensor: t.clone(),
    };
    let module = AdapterModule {
        tensors: [("a".to_owned(), tensor(a)), ("b".to_owned(), tensor(b))]
            .into_iter()
            .collect(),
    };
    Edit::Lora {
        module,
        kind: LoraKind::Linear {
            fan_in_fan_out: false,
        },
        scale,
        dora: false,
        round_first: true,
    }
}

/// What resolving a `target_parameters` wrapper needs to know.
struct ParamContext<'a> {
    base: &'a Checkpoint,
    mapping: Option<&'a peftkit_remap::Mapping>,
    resolver: &'a PatternResolver,
    use_rslora: bool,
    weight: f64,
    adapter: &'a Path,
}

impl ParamContext<'_> {
    /// The edits of a LoRA on a module *parameter* (`target_parameters`), or `None` when the
    /// module is not a parameter wrapper (a plain `target_modules` LoRA).
    ///
    /// peft wraps a module once per targeted parameter, in the order the module registers its
    /// parameters, so the nesting depth (`.base_layer` levels) alone does not say which
    /// parameter a wrapper adapts. The shapes do: `A (r·E, in)` and `B (out, r·E)` must fit the
    /// parameter `(E, out, in)` (or `(out, in)`). Only when several parameters fit equally is
    /// the depth used, counting from the last listed target.
    fn edits(
        &self,
        module: &str,
        targets: &[String],
        a: &Tensor,
        b: &Tensor,
        key: &str,
    ) -> Result<Option<Vec<(String, Edit)>>, MergeError> {
        let real = strip_base_layers(module);
        let depth = (module.len() - real.len()) / ".base_layer".len();
        // A bare name (`gate_up_proj`) may name a parameter of any module; peft wraps only the
        // modules that have it. A named owner (`mlp.experts.gate_up_proj`) must match.
        let mut owned: Vec<String> = Vec::new();
        let mut named_owner = false;
        for t in targets {
            let (owner, param) = t.rsplit_once('.').unwrap_or(("", t.as_str()));
            let owns = owner.is_empty() || real == owner || real.ends_with(&format!(".{owner}"));
            named_owner |= owns && !owner.is_empty();
            if owns && !owned.iter().any(|p| p == param) {
                owned.push(param.to_owned());
            }
        }
        if owned.is_empty() {
            return Ok(None);
        }
        let mut fitting = Vec::new();
        for param in &owned {
            if let Some(edits) = self.param_edits(&format!("{real}.{param}"), a, b)? {
                fitting.push((param.clone(), edits));
            }
        }
        let chosen = match fitting.len() {
            0 => None,
            1 => fitting.pop(),
            n => {
                let at = n.checked_sub(1 + depth);
                at.and_then(|i| fitting.into_iter().nth(i))
            }
        };
        match chosen {
            Some((_, edits)) => Ok(Some(edits)),
            // Only bare names, none of them a parameter here: a plain module LoRA.
            None if !named_owner && depth == 0 => Ok(None),
            None => Err(MergeError::NoBaseTensor {
                adapter: self.adapter.to_owned(),
                key: key.to_owned(),
                module: real.to_owned(),
                expected: format!(
                    "{real}.{{{}}} of a shape that fits lora_A {:?} and lora_B {:?}",
                    owned.join(","),
                    a.shape(),
                    b.shape()
                ),
                base: self.base.dir.clone(),
            }),
        }
    }

    /// The edits for the LoRA on parameter `v5_name`, if the base holds it (fused, 2-D, or
    /// split per expert on disk) with shapes that fit the factors.
    fn param_edits(
        &self,
        v5_name: &str,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<Option<Vec<(String, Edit)>>, MergeError> {
        let unsupported = |what: String| MergeError::Unsupported {
            adapter: self.adapter.to_owned(),
            what,
        };
        let (Some(&ra), Some(&fin), Some(&out), Some(&rb)) = (
            a.shape().first(),
            a.shape().get(1),
            b.shape().first(),
            b.shape().get(1),
        ) else {
            return Ok(None);
        };
        if ra != rb || a.shape().len() != 2 || b.shape().len() != 2 {
            return Ok(None);
        }
        let r = self
            .resolver
            .rank_for(v5_name)
            .map_err(|e| unsupported(e.to_string()))? as usize;
        let alpha = self
            .resolver
            .alpha_for(v5_name)
            .map_err(|e| unsupported(e.to_string()))?;
        if let Some(t) = self.base.get(v5_name) {
            return Ok(match *t.shape() {
                // A checkpoint in the v5 layout holds the fused tensor.
                [e, o, i] if r > 0 && e * r == ra && o == out && i == fin => {
                    let scale = scale_of(alpha, r, self.use_rslora, self.weight, self.adapter)?;
                    Some(vec![(
                        v5_name.to_owned(),
                        Edit::Experts {
                            a: a.clone(),
                            b: b.clone(),
                            scale,
                        },
                    )])
                }
                // A 2-D parameter (a router weight): LoRA with the delta rounded first.
                [o, i] if o == out && i == fin => {
                    let scale = scale_of(alpha, ra, self.use_rslora, self.weight, self.adapter)?;
                    Some(vec![(v5_name.to_owned(), router_edit(a, b, scale))])
                }
                _ => None,
            });
        }
        let Some(mapping) = self.mapping else {
            return Ok(None);
        };
        if let Some(name) = on_disk_name(mapping, v5_name, self.base) {
            // A renamed 2-D parameter (Mixtral's router is `block_sparse_moe.gate` on disk).
            return match self.base.get(&name).map(|t| t.shape().to_vec()) {
                Some(shape) if shape == [out, fin] => {
                    let scale = scale_of(alpha, ra, self.use_rslora, self.weight, self.adapter)?;
                    Ok(Some(vec![(name, router_edit(a, b, scale))]))
                }
                _ => Ok(None),
            };
        }
        if r == 0 || ra % r != 0 {
            return Ok(None);
        }
        let experts = ra / r;
        let scale = scale_of(alpha, r, self.use_rslora, self.weight, self.adapter)?;
        let fused_shape = [experts, out, fin];
        let mut edits = Vec::new();
        for e in 0..experts {
            let Ok(pieces) =
                mapping.expert_pieces(v5_name, &fused_shape, e, &peftkit_remap::Revert::FromConfig)
            else {
                return Ok(None);
            };
            for p in pieces {
                let transposed = match p.axes.as_slice() {
                    [Some(1), Some(2)] => false,
                    [Some(2), Some(1)] => true,
                    other => {
                        return Err(unsupported(format!(
                            "`{}` maps to fused axes {other:?}",
                            p.original_name
                        )))
                    }
                };
                match self.base.get(&p.original_name) {
                    Some(t) if t.shape() == p.original_shape.as_slice() => {}
                    _ => return Ok(None),
                }
                let edit = Edit::ExpertPiece {
                    a: a.clone(),
                    b: b.clone(),
                    experts,
                    expert: e,
                    rows: p.region[1].clone(),
                    cols: p.region[2].clone(),
                    transposed,
                    scale,
                };
                edits.push((p.original_name.clone(), edit));
            }
        }
        Ok((!edits.is_empty()).then_some(edits))
    }
}

/// Matches a module path against a list of target names the way peft does (equal, or a
/// `.`-suffix).
fn in_list(names: &[String], module: &str) -> bool {
    names
        .iter()
        .any(|n| module == n || module.ends_with(&format!(".{n}")))
}

fn plan(
    base: &Checkpoint,
    base_config: Option<&ModelConfig>,
    adapters: &[(Adapter, f64)],
) -> Result<MergePlan, MergeError> {
    let mut steps: IndexMap<String, Vec<Step>> = IndexMap::new();
    let mut added: IndexMap<String, (Tensor, String)> = IndexMap::new();
    let mut untie = false;
    let tied = base_config
        .map(ModelConfig::tie_word_embeddings)
        .unwrap_or(false);
    // The conversion table of the base's model type: adapters name fused v5 parameters,
    // checkpoints on disk may hold them per expert.
    let remap_mapping = base_config
        .and_then(ModelConfig::model_type)
        .and_then(|t| peftkit_remap::Registry::builtin().ok()?.mapping(t).ok());
    for (adapter, weight) in adapters {
        let dir: Arc<Path> = Arc::from(adapter.dir.as_path());
        let unsupported = |what: String| MergeError::Unsupported {
            adapter: adapter.dir.clone(),
            what,
        };
        let push = |steps: &mut IndexMap<String, Vec<Step>>, key: &str, edit: Edit| {
            steps.entry(key.to_owned()).or_default().push(Step {
                adapter: dir.clone(),
                edit,
            });
        };
        let base_tensor =
            |module: &str, param: &str, key: &str| -> Result<(String, Tensor), MergeError> {
                let expected = format!("{module}.{param}");
                let found = base
                    .get(&expected)
                    .map(|t| (expected.clone(), t.clone()))
                    .or_else(|| {
                        let name = on_disk_name(remap_mapping.as_ref()?, &expected, base)?;
                        base.get(&name).map(|t| (name, t.clone()))
                    });
                match found {
                    Some(found) => Ok(found),
                    None => Err(MergeError::NoBaseTensor {
                        adapter: adapter.dir.clone(),
                        key: key.to_owned(),
                        module: module.to_owned(),
                        expected,
                        base: base.dir.clone(),
                    }),
                }
            };
        if let Some(key) = adapter.unexpected.first() {
            return Err(unsupported(format!(
                "`{key}` is not a tensor of a {} adapter (prompt-learning adapters have nothing to merge)",
                adapter.config.peft_type()
            )));
        }
        // Full tensors carried by the adapter replace the base's before its deltas apply, as
        // peft loads them into the base model first.
        for (base_key, rep) in &adapter.replacements {
            if base.get(base_key).is_some() {
                push(
                    &mut steps,
                    base_key,
                    Edit::Replace {
                        source: rep.tensor.clone(),
                    },
                );
            } else if tied && base_key.ends_with("lm_head.weight") {
                // A trained lm_head copy on a tied model: the merge unties the embeddings.
                let source = base
                    .tensors()
                    .find(|(k, _)| k.ends_with("embed_tokens.weight") || k.ends_with("wte.weight"))
                    .map(|(k, _)| k.to_owned())
                    .unwrap_or_default();
                added.insert(base_key.clone(), (rep.tensor.clone(), source));
                untie = true;
            } else {
                return Err(MergeError::NoBaseTensor {
                    adapter: adapter.dir.clone(),
                    key: rep.key.clone(),
                    module: base_key.clone(),
                    expected: base_key.clone(),
                    base: base.dir.clone(),
                });
            }
        }
        if !adapter.shared.is_empty() {
            return Err(unsupported(format!(
                "{} adapters with shared tensors are not supported",
                adapter.config.peft_type()
            )));
        }
        match &adapter.config {
            AdapterConfig::Lora(cfg) => {
                let features = cfg.unsupported_merge_features();
                if !features.is_empty() {
                    return Err(unsupported(format!("LoRA with {}", features.join(", "))));
                }
                let target_params: Vec<String> = match &cfg.target_parameters {
                    Some(peftkit_peft::config::StringOrList::Many(v)) => v.clone(),
                    Some(peftkit_peft::config::StringOrList::One(s)) => vec![s.clone()],
                    None => Vec::new(),
                };
                let resolver = PatternResolver::new(cfg).map_err(|e| unsupported(e.to_string()))?;
                for (module, tensors) in &adapter.modules {
                    let key_of = |role: &str| {
                        tensors
                            .tensors
                            .get(role)
                            .map(|t| t.key.clone())
                            .unwrap_or_default()
                    };
                    if let Some(rows) = tensors.get("trainable_tokens") {
                        let indices = match &cfg.trainable_token_indices {
                            Some(TrainableTokenIndices::Indices(v)) => v.clone(),
                            Some(TrainableTokenIndices::PerModule(m)) => m
                                .iter()
                                .find(|(n, _)| module == *n || module.ends_with(&format!(".{n}")))
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default(),
                            None => {
                                return Err(unsupported(format!(
                                    "`{}` without trainable_token_indices in the config",
                                    key_of("trainable_tokens")
                                )))
                            }
                        };
                        let indices: Vec<usize> = indices
                            .iter()
                            .map(|&i| usize::try_from(i))
                            .collect::<Result<_, _>>()
                            .map_err(|_| unsupported("negative trainable token index".into()))?;
                        let (bk, _) = base_tensor(module, "weight", &key_of("trainable_tokens"))?;
                        push(
                            &mut steps,
                            &bk,
                            Edit::Rows {
                                indices,
                                rows: rows.clone(),
                            },
                        );
                    }
                    if !target_params.is_empty() {
                        if let (Some(a), Some(b)) = (tensors.get("a"), tensors.get("b")) {
                            let ctx = ParamContext {
                                base,
                                mapping: remap_mapping.as_ref(),
                                resolver: &resolver,
                                use_rslora: cfg.use_rslora,
                                weight: *weight,
                                adapter: &adapter.dir,
                            };
                            if let Some(edits) =
                                ctx.edits(module, &target_params, a, b, &key_of("a"))?
                            {
                                for (base_key, edit) in edits {
                                    push(&mut steps, &base_key, edit);
                                }
                                continue;
                            }
                        }
                    }
                    let (ra, kind_hint) = if tensors.get("embedding_a").is_some() {
                        ("embedding_a", Some(LoraKind::Embedding))
                    } else {
                        ("a", None)
                    };
                    let Some(a) = tensors.get(ra) else { continue };
                    let r = a.shape().first().copied().unwrap_or(0);
                    let alpha = resolver
                        .alpha_for(module)
                        .map_err(|e| unsupported(e.to_string()))?;
                    let scale = scale_of(alpha, r, cfg.use_rslora, *weight, &adapter.dir)?;
                    let (bk, bt) = base_tensor(module, "weight", &key_of(ra))?;
                    let kind = match kind_hint {
                        Some(k) => k,
                        None if bt.shape().len() == 2 => LoraKind::Linear {
                            fan_in_fan_out: cfg.fan_in_fan_out,
                        },
                        None if (3..=5).contains(&bt.shape().len()) => {
                            if a.shape().get(1) != bt.shape().get(1) {
                                return Err(unsupported(format!("`{bk}` is a grouped convolution; peft cannot merge LoRA into it (groups > 1)")));
                            }
                            LoraKind::Conv
                        }
                        None => {
                            return Err(MergeError::Shape {
                                adapter: adapter.dir.clone(),
                                key: key_of(ra),
                                adapter_shape: a.shape().to_vec(),
                                base_key: bk,
                                base_shape: bt.shape().to_vec(),
                            })
                        }
                    };
                    check_lora_shapes(adapter, tensors, kind, &bk, &bt)?;
                    let dora = tensors.get("magnitude").is_some();
                    push(
                        &mut steps,
                        &bk,
                        Edit::Lora {
                            module: tensors.clone(),
                            kind,
                            scale,
                            dora,
                            round_first: false,
                        },
                    );
                    if let Some(bias) = tensors.get("b_bias") {
                        let (bbk, _) = base_tensor(module, "bias", &key_of("b_bias"))?;
                        push(
                            &mut steps,
                            &bbk,
                            Edit::LoraBias {
                                bias: bias.clone(),
                                scale,
                            },
                        );
                    }
                }
            }
            AdapterConfig::Other(generic) => {
                let fields = &generic.fields;
                let fan_in_fan_out = fields
                    .get("fan_in_fan_out")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                match generic.peft_type.as_str() {
                    "IA3" => {
                        let ff: Vec<String> = fields
                            .get("feedforward_modules")
                            .and_then(|v| v.as_array())
                            .map(|a| {
                                a.iter()
                                    .filter_map(|s| s.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default();
                        for (module, tensors) in &adapter.modules {
                            let Some(v) = tensors.get("ia3_l") else {
                                continue;
                            };
                            let key = tensors
                                .tensors
                                .get("ia3_l")
                                .map(|t| t.key.clone())
                                .unwrap_or_default();
                            let feedforward = in_list(&ff, module);
                            let (bk, _) = base_tensor(module, "weight", &key)?;
                            push(
                                &mut steps,
                                &bk,
                                Edit::Ia3 {
                                    vector: v.clone(),
                                    feedforward,
                                    fan_in_fan_out,
                                },
                            );
                            let bias_key = format!("{module}.bias");
                            if !feedforward && base.get(&bias_key).is_some() {
                                push(&mut steps, &bias_key, Edit::Ia3Bias { vector: v.clone() });
                            }
                        }
                    }
                    method @ ("LOHA" | "LOKR") => {
                        let r = number(fields.get("r")).unwrap_or(8.0);
                        let alpha = number(fields.get("alpha")).unwrap_or(r);
                        if fields
                            .get("rank_pattern")
                            .and_then(|v| v.as_object())
                            .is_some_and(|m| !m.is_empty())
                            || fields
                                .get("alpha_pattern")
                                .and_then(|v| v.as_object())
                                .is_some_and(|m| !m.is_empty())
                        {
                            return Err(unsupported(format!(
                                "{method} with rank_pattern/alpha_pattern"
                            )));
                        }
                        if r.fract() != 0.0 || r < 1.0 {
                            return Err(unsupported(format!("{method} with r = {r}")));
                        }
                        let scale = scale_of(alpha, r as usize, false, *weight, &adapter.dir)?;
                        for (module, tensors) in &adapter.modules {
                            if tensors.get("t1").is_some() || tensors.get("t2").is_some() {
                                return Err(unsupported(format!(
                                    "{method} with effective-conv (CP) factors on `{module}`"
                                )));
                            }
                            let key = tensors
                                .tensors
                                .values()
                                .next()
                                .map(|t| t.key.clone())
                                .unwrap_or_default();
                            let (bk, _) = base_tensor(module, "weight", &key)?;
                            let edit = if method == "LOHA" {
                                Edit::Loha {
                                    module: tensors.clone(),
                                    scale,
                                }
                            } else {
                                Edit::Lokr {
                                    module: tensors.clone(),
                                    scale,
                                }
                            };
                            push(&mut steps, &bk, edit);
                        }
                    }
                    other => {
                        return Err(unsupported(format!(
                            "{other} adapters cannot be merged into weights"
                        )))
                    }
                }
            }
        }
    }
    Ok(MergePlan {
        steps,
        added,
        untie,
    })
}

fn check_lora_shapes(
    adapter: &Adapter,
    m: &AdapterModule,
    kind: LoraKind,
    base_key: &str,
    base: &Tensor,
) -> Result<(), MergeError> {
    let (ra, rb) = match kind {
        LoraKind::Embedding => ("embedding_a", "embedding_b"),
        _ => ("a", "b"),
    };
    let (Some(a), Some(b)) = (m.tensors.get(ra), m.tensors.get(rb)) else {
        return Ok(());
    };
    let bs = base.shape();
    let (a_s, b_s) = (a.tensor.shape(), b.tensor.shape());
    let ok = match kind {
        LoraKind::Linear {
            fan_in_fan_out: false,
        } => bs.len() == 2 && a_s.get(1) == Some(&bs[1]) && b_s.first() == Some(&bs[0]),
        LoraKind::Linear {
            fan_in_fan_out: true,
        } => bs.len() == 2 && a_s.get(1) == Some(&bs[0]) && b_s.first() == Some(&bs[1]),
        LoraKind::Embedding => {
            bs.len() == 2 && a_s.get(1) == Some(&bs[0]) && b_s.first() == Some(&bs[1])
        }
        LoraKind::Conv => b_s.first() == Some(&bs[0]) && a_s.get(1) == bs.get(1),
    } && a_s.first() == b_s.get(1);
    if ok {
        Ok(())
    } else {
        let bad = if a_s.first() == b_s.get(1) && b_s.first() == bs.first() {
            a
        } else {
            b
        };
        Err(MergeError::Shape {
            adapter: adapter.dir.clone(),
            key: bad.key.clone(),
            adapter_shape: bad.tensor.shape().to_vec(),
            base_key: base_key.to_owned(),
            base_shape: bs.to_vec(),
        })
    }
}

/// Refuses, before anything is written, the edits that exact numerics do not define (the
/// kernels would refuse them too, but only once the save is under way).
fn check_exact(plan: &MergePlan, unmerge: bool) -> Result<(), MergeError> {
    for (name, steps) in &plan.steps {
        for step in steps {
            let method = match &step.edit {
                Edit::Lora { dora: true, .. } => "DoRA",
                Edit::Loha { .. } => "LoHa",
                Edit::Lokr { .. } => "LoKr",
                Edit::Ia3 { .. } | Edit::Ia3Bias { .. } if unmerge => "IA3 unmerge",
                _ => continue,
            };
            return Err(MergeError::Unsupported {
                adapter: step.adapter.to_path_buf(),
                what: format!("`{name}`: {}", exact::refusal_reason(method)),
            });
        }
    }
    Ok(())
}

/// Merges `job.adapters` into `job.base` and writes the result to `job.out`, reporting data
/// bytes written through `on_bytes`.
///
/// The output keeps the base's layout (file names, tensor-to-file assignment, index, header
/// metadata) unless `max_shard_size` asks for a reshard; every other file of the base
/// (configs, tokenizer, chat template, custom code) is copied, and `config.json` gets
/// `tie_word_embeddings: false` when the merge unties the embeddings, as peft does.
pub fn merge(job: &MergeJob, on_bytes: &mut dyn FnMut(u64)) -> Result<MergeSummary, MergeError> {
    let start = Instant::now();
    let base = Checkpoint::open(&job.base)?;
    let base_dir = if job.base.is_dir() {
        job.base.clone()
    } else {
        base.dir.clone()
    };
    let config_path = base_dir.join("config.json");
    let mut config = if config_path.is_file() {
        Some(ModelConfig::read(&config_path)?)
    } else {
        None
    };
    let adapters = job
        .adapters
        .iter()
        .map(|a| Adapter::open(&a.dir).map(|ad| (ad, a.weight)))
        .collect::<Result<Vec<_>, _>>()?;
    let order = reduction_order()?;
    let plan = plan(&base, config.as_ref(), &adapters)?;
    if job.numerics == Numerics::Exact {
        check_exact(&plan, job.unmerge)?;
    }
    // A reshard plans on the layout transformers holds the model in (see below).
    let resave_mapping = match job.max_shard_size {
        Some(_) => Some(peftkit_remap::checkpoint_mapping(
            &peftkit_remap::Registry::builtin()?,
            config.as_ref(),
            None,
        )?),
        None => None,
    };
    if job.unmerge && !plan.added.is_empty() {
        return Err(MergeError::Unsupported {
            adapter: job
                .adapters
                .first()
                .map(|a| a.dir.clone())
                .unwrap_or_default(),
            what: "unmerge of an adapter that unties the embeddings".into(),
        });
    }
    if job.unmerge {
        let replacing = plan
            .steps
            .values()
            .flatten()
            .find(|s| matches!(s.edit, Edit::Replace { .. } | Edit::Rows { .. }));
        if let Some(step) = replacing {
            return Err(MergeError::Unsupported {
                adapter: step.adapter.to_path_buf(),
                what: "unmerge of an adapter that replaces whole tensors or rows (modules_to_save, trainable tokens): the original values are not in the adapter".into(),
            });
        }
    }

    let mut state = StateDict::new();
    let mut summary = MergeSummary {
        tensors_merged: 0,
        tensors_replaced: 0,
        tensors_copied: 0,
        tensors_added: plan.added.len(),
        bytes: 0,
        files: vec![],
        untied_embeddings: false,
        numerics: numerics_report(&plan, order, job.numerics),
        seconds: 0.0,
    };
    for (name, tensor) in base.tensors() {
        match plan.steps.get(name) {
            None => {
                summary.tensors_copied += 1;
                state.insert(name.to_owned(), tensor.clone());
            }
            Some(steps) => {
                if steps.iter().all(|s| matches!(s.edit, Edit::Replace { .. })) {
                    summary.tensors_replaced += 1;
                } else {
                    summary.tensors_merged += 1;
                }
                let opts = KernelOptions {
                    safe_merge: job.safe_merge,
                    unmerge: job.unmerge,
                    numerics: job.numerics,
                    ..KernelOptions::default()
                };
                let (base_t, steps, key) = (tensor.clone(), steps.clone(), name.to_owned());
                let lazy = Tensor::lazy(tensor.dtype(), tensor.shape().to_vec(), move || {
                    let mut data = base_t.bytes()?.into_owned();
                    for step in &steps {
                        apply(&key, base_t.dtype(), base_t.shape(), &mut data, step, &opts)?;
                    }
                    Ok(data)
                })?;
                state.insert(name.to_owned(), lazy);
            }
        }
    }
    for (name, (tensor, _)) in &plan.added {
        state.insert(name.clone(), tensor.clone());
    }
    if plan.untie {
        if let Some(c) = config.as_mut() {
            c.fields
                .insert("tie_word_embeddings".into(), serde_json::Value::Bool(false));
            summary.untied_embeddings = true;
        }
    }

    let mut options = SaveOptions {
        durable: job.durable,
        metadata: base.metadata().cloned().unwrap_or_default(),
        ..Default::default()
    };
    if job.base.is_dir() {
        options.extra_files = companion_files(&base_dir)?
            .into_iter()
            .filter(|(n, _)| !(summary.untied_embeddings && n == "config.json"))
            .collect();
    }
    if summary.untied_embeddings {
        options.config = config;
    }
    let save_plan = match (job.max_shard_size, &resave_mapping) {
        (Some(size), Some(mapping)) => {
            // transformers saves the merged model as it holds it: in the v5 layout it was
            // loaded into, reverted on save. The shards are planned on that, as in `reshard`.
            state = mapping.round_trip(&state)?.state;
            plan_save(
                &state,
                &SaveOptions {
                    max_shard_size: size,
                    ..options.clone()
                },
            )?
        }
        _ => with_added(SavePlan::from_checkpoint(&base), &plan.added, &state),
    };
    let mut written = 0u64;
    let report = save_planned(&job.out, &state, &save_plan, &options, &mut |n| {
        written += n;
        on_bytes(n)
    })?;
    summary.bytes = written;
    summary.files = report.weight_files;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Puts added tensors (an untied `lm_head`) into the file of their tie source and the index.
fn with_added(
    mut plan: SavePlan,
    added: &IndexMap<String, (Tensor, String)>,
    state: &StateDict,
) -> SavePlan {
    for (name, (_, source)) in added {
        let slot = plan
            .shards
            .iter()
            .position(|(_, names)| names.contains(source))
            .unwrap_or(0);
        if let Some((file, names)) = plan.shards.get_mut(slot) {
            names.push(name.clone());
            if let Some((_, index)) = plan.index.as_mut() {
                index.weight_map.insert(name.clone(), file.clone());
                let t = &state[name];
                index.total_size = index.total_size.map(|s| s + t.byte_len() as u64);
                index.total_parameters = index.total_parameters.map(|p| p + t.numel() as u64);
            }
        }
    }
    plan
}
