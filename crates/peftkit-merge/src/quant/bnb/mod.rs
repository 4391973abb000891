//! Merging into bitsandbytes 4-bit bases (`quant_method: "bitsandbytes"`, dispatched from
//! [`super::BaseQuant::read`]), and into the 4-bit round trip of a 16-bit base.
//!
//! Three ways, each reproducing what the real libraries do on the CPU ([`BnbMerge`]):
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
//! The 8-bit format (`SCB` row scales) is refused: see docs/formats.md.

mod codes;
mod state;
mod view;
mod weight;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use peftkit_checkpoint::{Checkpoint, ModelConfig, StateDict};
use serde::Serialize;

use crate::error::MergeError;
use crate::job::MergeJob;
use crate::kernels::Bnb4Type;
use crate::plan::MergePlan;
use crate::report::{QuantizationReport, RequantizedTensor};
use weight::Weight4;

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
    /// An 8-bit (LLM.int8) base.
    #[error("{base}: bitsandbytes 8-bit (LLM.int8, `SCB` row scales) bases are not supported: merge into the original 16-bit base, or dequantize it with transformers first")]
    Int8 {
        /// Base folder.
        base: PathBuf,
    },
    /// A config that says `bitsandbytes` over tensors without a 4-bit weight.
    #[error("{base}: config.json says quant_method `bitsandbytes`, but the base holds no 4-bit weight (no `*.weight.quant_state.bitsandbytes__nf4|fp4` tensor); was it saved by transformers from a 4-bit model? Merge into the original 16-bit model instead")]
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
    /// An edit peft does not merge into a 4-bit weight the way it is reproduced here.
    #[error("{tensor}: {what} into a 4-bit weight cannot be reproduced when re-quantizing (only LoRA pairs of Linear layers are, one re-quantization per adapter as peft does); merge with --dequantize")]
    Requantize {
        /// The 4-bit weight.
        tensor: String,
        /// The edit.
        what: &'static str,
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
        let int8 = config
            .and_then(|c| c.fields.get("quantization_config"))
            .and_then(|q| q.get("load_in_8bit"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if int8 || base.tensors().any(|(k, _)| k.ends_with(".SCB")) {
            return Err(BnbError::Int8 { base: dir() }.into());
        }
        let weights = Weight4::find_all(base).map_err(|e| BnbError::Weight {
            base: dir(),
            tensor: e.tensor,
            reason: e.reason,
        })?;
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
            BnbMerge::Plain | BnbMerge::Qlora(_) => Ok(base.clone()),
        }
    }

    /// Checks the plan against the mode (re-quantizing: the 4-bit round trip between adapters
    /// added to it), and for a QLoRA base returns the view with every weight the plan merges
    /// into replaced by its 4-bit round trip.
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
            BnbMerge::Qlora(q) => view::round_tripped(view, plan, *q),
            _ => Ok(view),
        }
    }

    /// The output state: re-quantized weights (and the stored tensors of the others) when
    /// re-quantizing, the merged state as it is otherwise.
    pub fn finish(
        &self,
        state: StateDict,
        base: &Checkpoint,
        plan: &MergePlan,
    ) -> Result<StateDict, MergeError> {
        match self {
            BnbMerge::Requantize(w) => view::requantized(state, base, w, plan),
            _ => Ok(state),
        }
    }

    /// Whether the output is planned anew (its tensors are not the base's).
    pub fn replans(&self) -> bool {
        matches!(self, BnbMerge::Dequantize(_))
    }

    /// Whether `quantization_config` leaves the output's config.json.
    pub fn drops_quantization_config(&self) -> bool {
        matches!(self, BnbMerge::Dequantize(_))
    }

    /// The summary's account of it: the re-quantized (or, for a QLoRA base, round-tripped)
    /// weights, or the count of dequantized ones. bitsandbytes' re-quantization is reproduced
    /// as peft runs it, so no error is measured (`max_abs_error` is `None`).
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
