//! Quantized bases: what `config.json`'s `quantization_config` says, and how a merge writes
//! into it.
//!
//! A merge into packed weights it does not understand would add a 16-bit delta to integers: a
//! silently wrong model. So every `quant_method` is refused except those [`BaseQuant::read`]
//! matches, each with its own module: [`fp8`] (transformers' fine-grained FP8, e4m3 with
//! block `weight_scale_inv`). Reshard and inspect never decode weights, so they pass any
//! quantized checkpoint through untouched.

mod fp8;
mod fp8_weight;

use std::path::Path;

use peftkit_checkpoint::ModelConfig;

use crate::error::MergeError;

pub(crate) use fp8::{Fp8Base, Fp8Format, Treatment};

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
}

impl BaseQuant {
    /// The treatment of the base in `base_dir` with `config`, refusing quantization methods
    /// the merge cannot write into, and `dequantize` of an unquantized base.
    pub(crate) fn read(
        base_dir: &Path,
        config: Option<&ModelConfig>,
        dequantize: bool,
    ) -> Result<Self, MergeError> {
        let Some((config, method)) = config.and_then(|c| Some((c, c.quant_method()?))) else {
            if dequantize {
                return Err(MergeError::NotQuantized {
                    base: base_dir.to_owned(),
                });
            }
            return Ok(BaseQuant::Plain);
        };
        match method {
            "fp8" => Ok(BaseQuant::Fp8 {
                format: Fp8Format::read(base_dir, config)?,
                dequantize,
            }),
            other => Err(MergeError::QuantizedBase {
                base: base_dir.to_owned(),
                method: other.to_owned(),
            }),
        }
    }

    /// Whether the output drops `quantization_config` (and so rewrites `config.json`).
    pub(crate) fn drops_config(&self) -> bool {
        matches!(
            self,
            BaseQuant::Fp8 {
                dequantize: true,
                ..
            }
        )
    }
}
