//! An 8-bit (LLM.int8) weight of a pre-quantized bitsandbytes checkpoint: the tensors
//! transformers writes for it, found by name, dequantized and re-quantized.
//!
//! For a quantized Linear `<m>` (weight `<m>.weight`), transformers 5.24 writes (through
//! bitsandbytes' `Linear8bitLt._save_to_state_dict`) `<m>.weight` (I8, the weight's shape),
//! `<m>.SCB` (F32 `(rows)`, each row's absmax) and `<m>.weight_format` (U8 scalar, `0`: row-major,
//! the only layout bitsandbytes still loads).

use peftkit_checkpoint::{Checkpoint, CheckpointError, Dtype, Tensor};

use super::banded::{rows_per_band, BandRows, BandSource, Dequantize, StoredBytes};
use super::view::compute_error;
use super::weight::PartError;
use crate::edit::Requantizer;
use crate::kernels::bnb_int8::bnb_int8_quantize_with_error;
use crate::kernels::{
    bnb_int8_dequantize, bnb_int8_dequantize_bytes_into, bnb_int8_quantize, decode_f32,
    round_slice_to, Int8Quantized,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The suffix of a module's row scales.
pub(crate) const SCB: &str = ".SCB";
const WEIGHT: &str = ".weight";
const WEIGHT_FORMAT: &str = ".weight_format";

/// One int8 weight and the handles of its tensors.
#[derive(Clone)]
pub(crate) struct Weight8 {
    /// The weight's name (`<m>.weight`), which holds the int8 codes.
    pub name: String,
    scb_key: String,
    format_key: Option<String>,
    weight: Tensor,
    scb: Tensor,
}

impl Weight8 {
    /// Every int8 weight of `base` (those with an `SCB` tensor), in file order.
    pub fn find_all(base: &Checkpoint) -> Result<Vec<Weight8>, PartError> {
        base.tensors()
            .filter_map(|(key, _)| Some((key, key.strip_suffix(SCB)?)))
            .map(|(key, module)| Self::open(base, key, module))
            .collect()
    }

    fn open(base: &Checkpoint, scb_key: &str, module: &str) -> Result<Self, PartError> {
        let err = |tensor: &str, reason: String| PartError {
            tensor: tensor.to_owned(),
            reason,
        };
        let name = format!("{module}{WEIGHT}");
        let weight = base.get(&name).cloned().ok_or_else(|| {
            err(
                &name,
                format!("missing: an int8 weight needs it beside its `{scb_key}`"),
            )
        })?;
        let scb = base
            .get(scb_key)
            .cloned()
            .ok_or_else(|| err(scb_key, "missing".into()))?;
        if weight.dtype() != Dtype::I8 || weight.shape().is_empty() {
            let why = format!(
                "dtype {:?}, shape {:?}: an int8 weight beside `{scb_key}` must be I8 with at least one dimension",
                weight.dtype(),
                weight.shape()
            );
            return Err(err(&name, why));
        }
        let rows = weight.numel() / weight.shape().last().copied().unwrap_or(1).max(1);
        if scb.dtype() != Dtype::F32 || scb.numel() != rows {
            let why = format!(
                "dtype {:?}, shape {:?}: expected F32 with one scale per row of `{name}` ({rows})",
                scb.dtype(),
                scb.shape()
            );
            return Err(err(scb_key, why));
        }
        let format_key = format!("{module}{WEIGHT_FORMAT}");
        let format_key = match base.get(&format_key) {
            None => None,
            Some(t) => {
                let bytes = t.bytes().map_err(|e| err(&format_key, e.to_string()))?;
                if t.dtype() != Dtype::U8 || bytes.as_ref() != [0] {
                    let why = format!(
                        "dtype {:?}, bytes {:?}: only the row-major format (a U8 0) is supported, as bitsandbytes itself loads no other",
                        t.dtype(),
                        bytes.as_ref()
                    );
                    return Err(err(&format_key, why));
                }
                Some(format_key)
            }
        };
        Ok(Weight8 {
            name,
            scb_key: scb_key.to_owned(),
            format_key,
            weight,
            scb,
        })
    }

    /// The names of the tensors stored beside the weight (not the weight itself).
    pub fn part_names(&self) -> Vec<String> {
        let mut names = vec![self.scb_key.clone()];
        names.extend(self.format_key.clone());
        names
    }

    /// The name of the row scales.
    pub fn scb_name(&self) -> &str {
        &self.scb_key
    }

    /// The shape of the stored row scales.
    pub fn scb_shape(&self) -> &[usize] {
        self.scb.shape()
    }

    /// The name of the `weight_format` tensor, if stored.
    pub fn format_name(&self) -> Option<&str> {
        self.format_key.as_deref()
    }

    /// The weight's shape.
    pub fn shape(&self) -> &[usize] {
        self.weight.shape()
    }

    /// The stored row scales.
    pub fn scb(&self) -> Result<Vec<f32>, BoxError> {
        Ok(decode_f32("SCB", Dtype::F32, &self.scb.bytes()?)?)
    }

    /// Rows per band ([`rows_per_band`]), if this weight can be merged band by band (see
    /// `banded`): 2-D, whose rows are quantized each on its own.
    pub fn band_rows(&self) -> Option<usize> {
        let &[_, cols] = self.shape() else {
            return None;
        };
        (cols > 0).then(|| rows_per_band(cols))
    }

    /// `int8_vectorwise_dequant`: the weight's values as `f32`, into `out` (which holds exactly
    /// as many).
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<(), BoxError> {
        let bytes = self.weight.bytes()?;
        Ok(bnb_int8_dequantize_bytes_into(
            &bytes,
            &self.scb()?,
            self.shape(),
            out,
        )?)
    }

    /// What `Int8Params` stores for `values` (the merged weight, `f32`).
    pub fn requantize(&self, values: &[f32]) -> Result<Int8Quantized, BoxError> {
        Ok(bnb_int8_quantize(values, self.shape())?)
    }

    /// [`Weight8::requantize`] and its error `max |dequantize(requantized) - values|`.
    pub fn requantize_with_error(&self, values: &[f32]) -> Result<(Int8Quantized, f64), BoxError> {
        Ok(bnb_int8_quantize_with_error(values, self.shape())?)
    }
}

/// Bands of rows as the dequantized view holds them: dequantized, rounded to its dtype.
impl BandSource for Weight8 {
    fn rows_in(&self, dtype: Dtype) -> Result<Box<Dequantize<'_>>, CheckpointError> {
        let err = |e| compute_error(&self.name, "dequantizing a bitsandbytes int8 weight", e);
        let codes = StoredBytes::of(&self.name, &self.weight)?;
        let scb = self.scb().map_err(err)?;
        let cols = self.shape().last().copied().unwrap_or(1);
        Ok(Box::new(move |r: BandRows, values: &mut [f32]| {
            let Some(scales) = scb.get(r.clone()) else {
                return Err(err(format!("rows {r:?} lie past the stored weight").into()));
            };
            codes.with(r.start * cols..r.end * cols, |codes| {
                bnb_int8_dequantize_bytes_into(codes, scales, &[r.len(), cols], values)
                    .map_err(|e| err(e.into()))
            })?;
            round_slice_to(dtype, values).map_err(|e| err(e.into()))
        }))
    }
}

/// An int8 weight after peft stored one adapter's result in it (`Int8Params(w_data)`, quantized
/// through `float16`), read back by the next adapter (`int8_vectorwise_dequant`, `f32`).
pub(crate) struct Requantize8 {
    pub weight: Weight8,
}

impl Requantizer for Requantize8 {
    fn round_trip(&self, values: &[f32]) -> Result<Vec<f32>, BoxError> {
        let q = self.weight.requantize(values)?;
        Ok(bnb_int8_dequantize(&q.weight, &q.scb, self.weight.shape())?)
    }
}
