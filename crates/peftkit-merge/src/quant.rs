//! Quantized bases: what `config.json`'s `quantization_config` says, and how a merge writes
//! into it.
//!
//! A merge into packed weights it does not understand would add a 16-bit delta to integers: a
//! silently wrong model. So every `quant_method` is refused except those of [`METHODS`], each
//! with its own module, and [`BaseQuant::read`] is the one place that tells them apart:
//!
//! * [`fp8`] (transformers' fine-grained FP8, e4m3 with block `weight_scale_inv`): merged
//!   through a dequantized copy of each touched weight, then re-quantized;
//! * [`bnb`] (bitsandbytes 4-bit NF4/FP4 and 8-bit LLM.int8, `quant_method: "bitsandbytes"`):
//!   planned and merged on a dequantized view of the base, then re-quantized as peft's
//!   `Linear4bit.merge` / `Linear8bitLt.merge` do.
//!   It also serves a 16-bit base a QLoRA adapter was trained on in 4 bits
//!   ([`crate::MergeJob::qlora_base`]).
//!
//! Both write the model dtype instead with [`crate::MergeJob::dequantize`], and both report
//! in [`crate::QuantizationReport`]. Reshard and inspect never decode weights, so they pass
//! any quantized checkpoint through untouched.

pub(crate) mod bnb;
mod fp8;
mod fp8_stream;
mod fp8_weight;
mod joint;
mod spill;

use std::path::Path;

use peftkit_checkpoint::{Checkpoint, ModelConfig};

use crate::error::MergeError;
use crate::job::MergeJob;
use crate::plan::MergePlan;
use crate::report::{QuantizationReport, RequantizedTensor};

pub(crate) use bnb::BnbMerge;
pub(crate) use fp8::{Fp8Base, Fp8Format, Treatment};

/// The `quant_method`s a merge writes into, as `config.json` names them (the refusal of any
/// other lists them).
pub(crate) const METHODS: &[&str] = &["fp8", "bitsandbytes"];

/// What a merge does with a quantized base.
pub(crate) enum BaseQuant {
    /// Not quantized: tensors are merged in their own dtype.
    Plain,
    /// FP8 block-scaled: merged through a dequantized copy, then re-quantized or (with
    /// `dequantize`) written in the model dtype.
    Fp8 {
        /// The format read from the config.
        format: Fp8Format,
        /// Write the model dtype instead of FP8.
        dequantize: bool,
    },
    /// bitsandbytes 4-bit or 8-bit (re-quantized or dequantized), or the 4-bit round trip of a
    /// 16-bit QLoRA base. Never [`BnbMerge::Plain`].
    Bnb(BnbMerge),
}

impl BaseQuant {
    /// The treatment `job` asks for of `base` (in `base_dir`) with `config`, refusing
    /// quantization methods the merge cannot write into, `dequantize` of an unquantized base,
    /// and `qlora_base` of a quantized one.
    pub(crate) fn read(
        job: &MergeJob,
        base: &Checkpoint,
        base_dir: &Path,
        config: Option<&ModelConfig>,
    ) -> Result<Self, MergeError> {
        let Some((config, method)) = config.and_then(|c| Some((c, c.quant_method()?))) else {
            if job.dequantize {
                return Err(MergeError::NotQuantized {
                    base: base_dir.to_owned(),
                });
            }
            // A 16-bit base: plain, or (`qlora_base`) rounded through 4 bits first.
            return Ok(match BnbMerge::detect(job, base, None)? {
                BnbMerge::Plain => BaseQuant::Plain,
                bnb => BaseQuant::Bnb(bnb),
            });
        };
        if job.qlora_base.is_some() {
            return Err(bnb::BnbError::AlreadyQuantized {
                base: base_dir.to_owned(),
                method: method.to_owned(),
            }
            .into());
        }
        match method {
            "fp8" => Ok(BaseQuant::Fp8 {
                format: Fp8Format::read(base_dir, config)?,
                dequantize: job.dequantize,
            }),
            "bitsandbytes" => match BnbMerge::detect(job, base, Some(config))? {
                BnbMerge::Plain => Err(bnb::BnbError::NoWeights {
                    base: base_dir.to_owned(),
                }
                .into()),
                bnb => Ok(BaseQuant::Bnb(bnb)),
            },
            other => Err(MergeError::QuantizedBase {
                base: base_dir.to_owned(),
                method: other.to_owned(),
                supported: METHODS.join(", "),
            }),
        }
    }

    /// The bitsandbytes treatment ([`BnbMerge::Plain`] for any other base).
    pub(crate) fn bnb(&self) -> &BnbMerge {
        match self {
            BaseQuant::Bnb(b) => b,
            _ => &BnbMerge::Plain,
        }
    }

    /// The FP8 view of `base` (in `base_dir`) the merge writes through, for an FP8 base.
    pub(crate) fn fp8<'a>(&self, base: &'a Checkpoint, base_dir: &Path) -> Option<Fp8Base<'a>> {
        match self {
            BaseQuant::Fp8 { format, dequantize } => {
                Some(Fp8Base::new(base, base_dir, format.clone(), *dequantize))
            }
            _ => None,
        }
    }

    /// Whether the output drops `quantization_config` (and so rewrites `config.json`).
    pub(crate) fn drops_config(&self) -> bool {
        match self {
            BaseQuant::Plain => false,
            BaseQuant::Fp8 { dequantize, .. } => *dequantize,
            BaseQuant::Bnb(b) => b.drops_quantization_config(),
        }
    }

    /// The summary's account of the merge, once the output is written (`fp8`: the FP8 view
    /// the output was written through, which measured the re-quantization errors).
    pub(crate) fn report(
        &self,
        plan: &MergePlan,
        fp8: Option<&Fp8Base<'_>>,
    ) -> Option<QuantizationReport> {
        match (self, fp8) {
            (BaseQuant::Fp8 { format, dequantize }, Some(fp8)) => Some(QuantizationReport {
                method: "fp8".into(),
                output: if *dequantize { "dequantized" } else { "kept" }.into(),
                format: "e4m3".into(),
                double_quant: false,
                dtype: peftkit_checkpoint::torch_dtype_name(format.dtype).map(Into::into),
                tensors_dequantized: if *dequantize { fp8.weights() } else { 0 },
                requantized: fp8
                    .errors()
                    .into_iter()
                    .map(|(tensor, e)| RequantizedTensor {
                        tensor,
                        max_abs_error: Some(e),
                    })
                    .collect(),
            }),
            (BaseQuant::Bnb(b), _) => b.report(plan),
            _ => None,
        }
    }
}
