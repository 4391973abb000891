//! Merging into bitsandbytes 4-bit and 8-bit bases (`quant_method: "bitsandbytes"`,
//! dispatched from [`super::BaseQuant::read`]), and into the 4-bit round trip of a 16-bit base.
//!
//! Three ways for 4-bit bases, each reproducing what the real libraries do on the CPU
//! ([`BnbMerge`]):
//!
//! * **re-quantized** (a pre-quantized base, the default): peft's `Linear4bit.merge`, adapter
//!   by adapter in order: `dequantize_4bit(W)` in the weight's dtype, `+ Δ` in `f32` (or DoRA,
//!   cast back to that dtype), quantized again with the weight's settings (its stored dtype
//!   becomes that of the sum). The round trip between adapters is an
//!   [`crate::edit::Edit::Requantize`] step the plan gets after planning. Untouched weights keep
//!   their bytes; the base's layout and `quantization_config` are kept;
//! * **dequantized** (`MergeJob::dequantize`): transformers' `model.dequantize()` then peft's
//!   plain merge: every 4-bit weight becomes its dtype, `quantization_config` is dropped, the
//!   output planned anew as `save_pretrained` plans it;
//! * **QLoRA base** (`MergeJob::qlora_base`, a 16-bit base): every weight the adapter merges
//!   into is replaced by `dequantize_4bit(quantize_4bit(W))` first, the weights a QLoRA adapter
//!   was trained against; the other tensors are kept as they are.
//!
//! 8-bit (LLM.int8, `SCB` row scales) bases are merged re-quantized or dequantized too, in
//! [`int8`].

mod banded;
mod codes;
mod int8;
mod qlora;
mod state;
mod streamed;
mod view;
mod weight;
mod weight8;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use peftkit_checkpoint::{Checkpoint, Dtype, ModelConfig, StateDict};
use serde::Serialize;

use crate::error::MergeError;
use crate::job::MergeJob;
use crate::kernels::{Bnb4Type, MergeOptions};
use crate::plan::MergePlan;
use crate::quant::joint::{KeepBudget, Spill};
use crate::report::{QuantizationReport, RequantizedTensor};
use int8::Int8Merge;
pub use int8::Int8RangeError;
use weight::Weight4;
use weight8::Weight8;

/// The 4-bit quantization a QLoRA adapter was trained on (`merge --qlora-base`):
/// bitsandbytes with transformers' settings (blocks of 64, uint8 storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QloraBase {
    /// NF4 or FP4.
    #[serde(serialize_with = "kind_name")]
    pub kind: Bnb4Type,
    /// `bnb_4bit_use_double_quant=True`: the block scales were themselves quantized.
    pub double_quant: bool,
}

fn kind_name<S: serde::Serializer>(k: &Bnb4Type, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match k {
        Bnb4Type::Nf4 => "nf4",
        Bnb4Type::Fp4 => "fp4",
    })
}

/// `nf4` or `fp4` was expected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown 4-bit type {0:?}: expected nf4 or fp4")]
pub struct ParseBnb4TypeError(String);

impl FromStr for Bnb4Type {
    type Err = ParseBnb4TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nf4" => Ok(Bnb4Type::Nf4),
            "fp4" => Ok(Bnb4Type::Fp4),
            other => Err(ParseBnb4TypeError(other.to_owned())),
        }
    }
}

/// How a merge treats a quantized (or to-be-quantized) base.
pub(crate) enum BnbMerge {
    /// Not a bitsandbytes base, no QLoRA round trip.
    Plain,
    Requantize(Vec<Weight4>),
    Dequantize(Vec<Weight4>),
    Qlora(QloraBase),
    /// An 8-bit base, re-quantized or dequantized.
    Int8(Int8Merge),
}

/// A bitsandbytes base that cannot be merged as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BnbError {
    /// A 4-bit weight's tensors are missing or unreadable.
    #[error("{base}: bitsandbytes tensor `{tensor}`: {reason}")]
    Weight {
        /// Base folder.
        base: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// int8 weights (`SCB` row scales) without a bitsandbytes `quantization_config`.
    #[error("{base}: holds bitsandbytes int8 weights (`*.SCB` row scales) but config.json has no bitsandbytes quantization_config; restore the config.json transformers saved with them")]
    Int8WithoutConfig {
        /// Base folder.
        base: PathBuf,
    },
    /// Both 4-bit and 8-bit weights in one base (transformers writes one or the other).
    #[error("{base}: holds both bitsandbytes 4-bit and 8-bit weights; transformers writes one kind per model, so which merge reproduces it is unknown")]
    MixedBits {
        /// Base folder.
        base: PathBuf,
    },
    /// An int8 base dequantized without a model dtype to dequantize to.
    #[error("{base}: config.json's dtype {found:?} is not the float dtype `model.dequantize()` rounds int8 weights to; set \"dtype\" to the model's (\"bfloat16\", \"float16\" or \"float32\")")]
    Int8Dtype {
        /// Base folder.
        base: PathBuf,
        /// What config.json says (`None`: no dtype).
        found: Option<String>,
    },
    /// A config that says `bitsandbytes` over tensors without a quantized weight.
    #[error("{base}: config.json says quant_method `bitsandbytes`, but the base holds no quantized weight (no `*.weight.quant_state.bitsandbytes__nf4|fp4` or `*.SCB` tensor); was it saved by transformers from a quantized model (int8 with llm_int8_has_fp16_weight keeps 16-bit weights)? Merge into it as a 16-bit model after removing quantization_config, or into the original 16-bit model")]
    NoWeights {
        /// Base folder.
        base: PathBuf,
    },
    /// `--qlora-base` on a base that is already quantized.
    #[error("{base}: --qlora-base quantizes a 16-bit base; this one is already quantized ({method}): merge into it directly (or with --dequantize)")]
    AlreadyQuantized {
        /// Base folder.
        base: PathBuf,
        /// Its `quant_method`.
        method: String,
    },
    /// An edit peft does not merge into a quantized weight the way it is reproduced here.
    #[error("{tensor}: {what} into a {bits}-bit weight cannot be reproduced when re-quantizing (see docs/formats.md, \"What is refused\"); merge with --dequantize")]
    Requantize {
        /// The quantized weight.
        tensor: String,
        /// The edit.
        what: &'static str,
        /// 4 or 8.
        bits: u8,
    },
}

impl BnbMerge {
    /// The treatment `job` asks for, given the base's tensors and config.
    pub fn detect(
        job: &MergeJob,
        base: &Checkpoint,
        config: Option<&ModelConfig>,
    ) -> Result<Self, MergeError> {
        let dir = || base.dir.clone();
        let part_error = |e: weight::PartError| BnbError::Weight {
            base: dir(),
            tensor: e.tensor,
            reason: e.reason,
        };
        let weights = Weight4::find_all(base).map_err(part_error)?;
        let int8 = Weight8::find_all(base).map_err(part_error)?;
        if !int8.is_empty() {
            let Some(config) = config else {
                return Err(BnbError::Int8WithoutConfig { base: dir() }.into());
            };
            if !weights.is_empty() {
                return Err(BnbError::MixedBits { base: dir() }.into());
            }
            let dtype = match job.dequantize {
                true => Some(
                    model_dtype(config)
                        .map_err(|found| BnbError::Int8Dtype { base: dir(), found })?,
                ),
                false => None,
            };
            return Ok(BnbMerge::Int8(Int8Merge::new(
                int8,
                dtype,
                job.allow_nonfinite,
            )));
        }
        Ok(match (job.qlora_base, job.dequantize, weights.is_empty()) {
            (Some(_), _, false) => {
                return Err(BnbError::AlreadyQuantized {
                    base: dir(),
                    method: "bitsandbytes".into(),
                }
                .into())
            }
            (Some(q), _, true) => BnbMerge::Qlora(q),
            // No 4-bit weight: `BaseQuant::read` refuses a config that claims some.
            (None, _, true) => BnbMerge::Plain,
            (None, true, false) => BnbMerge::Dequantize(weights),
            (None, false, false) => BnbMerge::Requantize(weights),
        })
    }

    /// The base as the planner and the kernels see it: 4-bit weights as float tensors of their
    /// logical shape (in `f32` when re-quantizing, peft's `W + Δ` being `f32`), their other
    /// tensors hidden.
    pub fn view(&self, base: &Checkpoint) -> Result<Checkpoint, MergeError> {
        match self {
            BnbMerge::Requantize(w) => view::dequantized(base, w, true),
            BnbMerge::Dequantize(w) => view::dequantized(base, w, false),
            BnbMerge::Int8(m) => m.view(base),
            BnbMerge::Plain | BnbMerge::Qlora(_) => Ok(base.clone()),
        }
    }

    /// Checks the plan against the mode (re-quantizing: the 4-bit or int8 round trip between
    /// adapters added to it), and for a QLoRA base returns the view with every weight the plan
    /// merges into replaced by its 4-bit round trip.
    pub fn after_plan(
        &self,
        view: Checkpoint,
        plan: &mut MergePlan,
    ) -> Result<Checkpoint, MergeError> {
        match self {
            BnbMerge::Requantize(w) => {
                view::sequence_requantized(w, plan)?;
                Ok(view)
            }
            BnbMerge::Int8(m) => {
                m.sequence(plan)?;
                Ok(view)
            }
            BnbMerge::Qlora(q) => view::round_tripped(view, plan, *q),
            _ => Ok(view),
        }
    }

    /// The output state: re-quantized weights (and the stored tensors of the others) when
    /// re-quantizing, the merged state as it is otherwise. `spill_dir`, on the output's file
    /// system, takes the double-quantized weights computed while planning past the memory
    /// budget (`quant::spill`).
    /// `opts` and `check` (refuse new NaN/Inf) are the merge's, for the weights a 4-bit
    /// re-quantization computes itself band by band.
    pub fn finish(
        &self,
        state: StateDict,
        (base, plan): (&Checkpoint, &MergePlan),
        spill_dir: &Path,
        (opts, check): (&MergeOptions, bool),
    ) -> Result<StateDict, MergeError> {
        match self {
            BnbMerge::Requantize(w) => {
                let budget = KeepBudget::default().spilling(spill(w, base, spill_dir));
                let settings = (Arc::new(budget), opts, check);
                view::requantized(state, base, w, plan, settings)
            }
            BnbMerge::Dequantize(w) => {
                let weights = w.iter().map(|w| {
                    let (shape, rows) = (w.state.shape.clone(), w.band_rows());
                    (w.name.clone(), shape, rows, w.clone())
                });
                Ok(streamed::stream_dequantized(
                    state,
                    weights,
                    plan,
                    (opts, check),
                )?)
            }
            BnbMerge::Int8(m) => m.finish(state, (base, plan), (opts, check)),
            BnbMerge::Qlora(q) => {
                let weights = view::round_trip_targets(plan).filter_map(|name| {
                    let (rows, band) = qlora::QloraRows::new(name, base.get(name)?, *q)?;
                    let shape = base.get(name)?.shape().to_vec();
                    Some((name.clone(), shape, Some(band), rows))
                });
                Ok(streamed::stream_dequantized(
                    state,
                    weights,
                    plan,
                    (opts, check),
                )?)
            }
            _ => Ok(state),
        }
    }

    /// Whether the output is planned anew (its tensors are not the base's).
    pub fn replans(&self) -> bool {
        self.dequantizes()
    }

    /// Whether `quantization_config` leaves the output's config.json.
    pub fn drops_quantization_config(&self) -> bool {
        self.dequantizes()
    }

    fn dequantizes(&self) -> bool {
        match self {
            BnbMerge::Dequantize(_) => true,
            BnbMerge::Int8(m) => m.dequantizes(),
            _ => false,
        }
    }

    /// The summary's account of it: the re-quantized (or, for a QLoRA base, round-tripped)
    /// weights, or the count of dequantized ones. The 4-bit re-quantization is reproduced as
    /// peft runs it and no error is measured (`max_abs_error` is `None`); the int8 one reports
    /// each weight's error (see [`int8`]).
    pub fn report(&self, plan: &MergePlan) -> Option<QuantizationReport> {
        let name = |k: Bnb4Type| match k {
            Bnb4Type::Nf4 => "nf4",
            Bnb4Type::Fp4 => "fp4",
        };
        let listed = |names: Vec<String>| {
            names
                .into_iter()
                .map(|tensor| RequantizedTensor {
                    tensor,
                    max_abs_error: None,
                })
                .collect()
        };
        let of = |w: &[Weight4], output: &str, requantized| {
            let first = w.first()?;
            Some(QuantizationReport {
                method: "bitsandbytes".into(),
                output: output.into(),
                format: name(first.state.kind().ok()?).into(),
                double_quant: first.state.nested(),
                dtype: None,
                tensors_dequantized: if output == "dequantized" { w.len() } else { 0 },
                requantized,
            })
        };
        match self {
            BnbMerge::Plain => None,
            BnbMerge::Int8(m) => Some(m.report(plan)),
            BnbMerge::Requantize(w) => {
                let touched = w.iter().filter(|w| plan.steps.contains_key(&w.name));
                of(w, "kept", listed(touched.map(|w| w.name.clone()).collect()))
            }
            BnbMerge::Dequantize(w) => of(w, "dequantized", vec![]),
            BnbMerge::Qlora(q) => Some(QuantizationReport {
                method: "bitsandbytes".into(),
                output: "qlora-base".into(),
                format: name(q.kind).into(),
                double_quant: q.double_quant,
                dtype: None,
                tensors_dequantized: 0,
                requantized: listed(view::round_trip_targets(plan).cloned().collect()),
            }),
        }
    }
}

/// The dtype `model.dequantize()` rounds to: config.json's `dtype` (or `torch_dtype`), or
/// what it says instead.
fn model_dtype(config: &ModelConfig) -> Result<Dtype, Option<String>> {
    let name = config.dtype();
    name.and_then(state::torch_dtype)
        .ok_or_else(|| name.map(Into::into))
}

/// 0: detect; 1: no AVX-512; 2: AVX-512 (see [`set_bnb_avx512`]).
static AVX512_OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Makes this process's bitsandbytes dequantization behave as on a host with (`Some(true)`) or
/// without (`Some(false)`) AVX-512, or as on this host (`None`): to reproduce on one machine a
/// dequantization made on another (the fixture tests run as on the fixtures' host).
pub fn set_bnb_avx512(avx512: Option<bool>) {
    AVX512_OVERRIDE.store(avx512.map_or(0, |a| 1 + u8::from(a)), Ordering::Relaxed);
}

/// Whether this host runs bitsandbytes' AVX-512 CPU kernels (it decides how 4-bit weights
/// whose rows are not whole blocks read their scales, and FP4's sign of zero).
pub(crate) fn host_avx512() -> bool {
    match AVX512_OVERRIDE.load(Ordering::Relaxed) {
        0 => {}
        v => return v == 2,
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// torch's intra-op thread count on this host, which splits the nested mean of weights with
/// more than 32768 blocks (`PEFTKIT_TORCH_THREADS` overrides it, to match another setting).
pub(crate) fn torch_threads() -> usize {
    std::env::var("PEFTKIT_TORCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The spill file of a re-quantizing merge into `base` when any of its `weights` is
/// double-quantized (only those are computed ahead of their writes), in `dir`. It leaves the
/// output's room free: the base's size and an eighth more.
fn spill(weights: &[Weight4], base: &Checkpoint, dir: &Path) -> Option<Spill> {
    if !weights.iter().any(|w| w.state.nested()) {
        return None;
    }
    let output = base.total_bytes();
    Spill::in_dir(dir, output + output / 8)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use indexmap::IndexMap;
    use peftkit_checkpoint::{plan_save, save_planned, SaveOptions, Tensor};

    use super::*;
    use crate::edit::{Edit, Step};

    fn fixture(case: &str) -> Checkpoint {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        Checkpoint::open(&root.join(case)).unwrap()
    }

    /// Saves what `bnb.finish` makes of `base` when every quantized weight is merged, each
    /// merged weight a lazy `f32` tensor counting its computations; returns how many ran.
    fn computations(bnb: &BnbMerge, base: &Checkpoint, names: &[String]) -> usize {
        computations_within(bnb, base, names, None)
    }

    /// [`computations`], a 4-bit merge's budget `budget` when given.
    fn computations_within(
        bnb: &BnbMerge,
        base: &Checkpoint,
        names: &[String],
        budget: Option<KeepBudget>,
    ) -> usize {
        let view = bnb.view(base).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut state = StateDict::new();
        let mut steps = IndexMap::new();
        for (name, t) in view.tensors() {
            let t = match names.contains(&name.to_owned()) {
                true => {
                    let (view, runs) = (t.clone(), runs.clone());
                    Tensor::lazy(t.dtype(), t.shape().to_vec(), move || {
                        runs.fetch_add(1, Ordering::Relaxed);
                        Ok(view.bytes()?.into_owned())
                    })
                    .unwrap()
                }
                false => t.clone(),
            };
            state.insert(name.to_owned(), t);
        }
        for name in names {
            let bias = Tensor::from_bytes(Dtype::F32, vec![1], vec![0; 4]).unwrap();
            let edit = Edit::LoraBias { bias, scale: 1.0 };
            let adapter: Arc<Path> = PathBuf::from("adapter").into();
            steps.insert(name.clone(), vec![Step { adapter, edit }]);
        }
        let plan = MergePlan {
            steps,
            added: IndexMap::new(),
            untie: false,
        };
        let out = match (bnb, budget) {
            (BnbMerge::Requantize(w), Some(b)) => {
                let settings = (Arc::new(b), &MergeOptions::default(), true);
                view::requantized(state, base, w.as_slice(), &plan, settings).unwrap()
            }
            _ => {
                let settings = (&MergeOptions::default(), true);
                bnb.finish(state, (base, &plan), Path::new("."), settings)
                    .unwrap()
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let options = SaveOptions::default();
        let save = plan_save(&out, &options).unwrap();
        save_planned(&dir.path().join("out"), &out, &save, &options).unwrap();
        runs.load(Ordering::Relaxed)
    }

    #[test]
    fn each_merged_weight_is_computed_once_for_all_its_tensors() {
        let base = fixture("bnb8/int8_bf16/base8");
        let weights = Weight8::find_all(&base).ok().unwrap();
        let names: Vec<String> = weights.iter().map(|w| w.name.clone()).collect();
        let int8 = BnbMerge::Int8(Int8Merge::new(weights, None, true));
        assert_eq!(computations(&int8, &base, &names), names.len());
        for case in ["fp4_f16", "nf4_nested_bf16"] {
            let base = fixture(&format!("bnb/{case}/base4"));
            let weights = Weight4::find_all(&base).ok().unwrap();
            let names: Vec<String> = weights.iter().map(|w| w.name.clone()).collect();
            let runs = computations(&BnbMerge::Requantize(weights), &base, &names);
            // A double-quantized weight is computed before the header, for the length of its
            // quantization state, and what that made is kept for the writes (see
            // `view::Requant4::state_bytes`).
            assert_eq!(runs, names.len(), "{case}");
        }
    }

    /// With no room for weights computed ahead and room for only one weight's parts per
    /// worker, a 4-bit weight is still computed once when written: its parts are written right
    /// after it, by its worker. (A double-quantized one is also computed while planning.)
    #[test]
    fn parts_written_after_their_weight_need_room_for_one_weight_per_worker() {
        for (case, per_weight) in [("fp4_f16", 1), ("nf4_nested_bf16", 2)] {
            let base = fixture(&format!("bnb/{case}/base4"));
            let weights = Weight4::find_all(&base).ok().unwrap();
            let names: Vec<String> = weights.iter().map(|w| w.name.clone()).collect();
            let parts = |w: &Weight4| -> usize {
                let names = w.part_names().into_iter();
                names
                    .map(|n| base.get(&n).map_or(0, |t| t.byte_len()))
                    .sum()
            };
            let largest = weights.iter().map(parts).max().unwrap();
            let total: usize = weights.iter().map(parts).sum();
            let room = largest * peftkit_checkpoint::save_workers();
            assert!(
                total > room,
                "{case}: the parts of all weights must not fit"
            );
            let budget = KeepBudget::new(0, room);
            let bnb = BnbMerge::Requantize(weights);
            let runs = computations_within(&bnb, &base, &names, Some(budget));
            assert_eq!(runs, per_weight * names.len(), "{case}");
        }
    }

    /// With no room in memory, a double-quantized weight computed while planning (its packed
    /// bytes and its parts) goes to the spill file and is not computed again; the file has no
    /// name.
    #[test]
    fn weights_computed_while_planning_spill_to_an_unnamed_file() {
        let base = fixture("bnb/nf4_nested_bf16/base4");
        let weights = Weight4::find_all(&base).ok().unwrap();
        let names: Vec<String> = weights.iter().map(|w| w.name.clone()).collect();
        let dir = tempfile::tempdir().unwrap();
        let file = spill(&weights, &base, dir.path());
        assert!(file.is_some(), "double quantization spills");
        let budget = KeepBudget::new(0, 0).spilling(file);
        let bnb = BnbMerge::Requantize(weights);
        let runs = computations_within(&bnb, &base, &names, Some(budget));
        assert_eq!(runs, names.len());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let plain = Weight4::find_all(&fixture("bnb/fp4_f16/base4"))
            .ok()
            .unwrap();
        assert!(
            spill(&plain, &base, dir.path()).is_none(),
            "nothing computed ahead"
        );
    }
}
