//! One FP8 weight of a merge's output: dequantized, merged, and (format kept) re-quantized
//! together with its `weight_scale_inv`.
//!
//! The weight and its scale are two tensors of the output that come from one computation, a
//! [`Joint`] one (see `joint`): the weight is an edit of its base bytes, which are dequantized
//! into one buffer in the model dtype, merged there, and re-quantized back over themselves,
//! where they lie in the file when the writer allows it; its scales are the computation's one
//! part.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use peftkit_checkpoint::{buffers, CheckpointError, Dtype, Tensor};

use super::joint::{Joint, JointSlot, KeepBudget};
use crate::edit::Step;
use crate::kernels::{
    decode_f32, dequantize_fp8_into, e8m0_to_f32, element_size, encode_f32, quantize_fp8_into,
    Fp8Grid, MergeMathError, MergeOptions as KernelOptions, ScaleKind,
};

/// How a merged weight is written back in FP8.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Requant {
    /// `scale_fmt`.
    pub kind: ScaleKind,
    /// The dtype the base stores the scale in (kept).
    pub scale_dtype: Dtype,
}

/// What one merge shares between its FP8 weights: their errors and the keep budget.
#[derive(Default)]
pub(crate) struct Shared {
    /// Re-quantization error of each weight, recorded when computed.
    pub errors: Mutex<BTreeMap<String, f64>>,
    /// What the weights may hold for later writes (see `joint`).
    pub budget: Arc<KeepBudget>,
}

/// One FP8 weight of the output and everything needed to compute it.
pub(crate) struct Fp8Weight {
    pub key: String,
    pub weight: Tensor,
    pub scale: Tensor,
    pub grid: Fp8Grid,
    pub requant: Option<Requant>,
    pub dtype: Dtype,
    pub steps: Vec<Step>,
    pub opts: KernelOptions,
    pub shared: Arc<Shared>,
    /// What the weight and its scale share (see `joint`).
    slot: JointSlot,
}

impl Fp8Weight {
    /// The weight `key` (`weight` with its `scale` cut by `grid`), merged by `steps` in `dtype`
    /// and, with `requant`, re-quantized.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        key: &str,
        (weight, scale, grid): (Tensor, Tensor, Fp8Grid),
        requant: Option<Requant>,
        dtype: Dtype,
        steps: Vec<Step>,
        opts: KernelOptions,
        shared: Arc<Shared>,
    ) -> Self {
        Fp8Weight {
            key: key.to_owned(),
            weight,
            scale,
            grid,
            requant,
            dtype,
            steps,
            opts,
            slot: JointSlot::new(shared.budget.clone()),
            shared,
        }
    }

    pub(crate) fn math(&self, e: MergeMathError) -> CheckpointError {
        CheckpointError::TensorCompute {
            tensor: self.key.clone(),
            context: "dequantizing FP8".into(),
            source: Box::new(e),
        }
    }

    /// Bytes of the weight in the model dtype.
    fn merged_len(&self) -> Result<usize, CheckpointError> {
        let size = element_size(self.dtype).map_err(|e| self.math(e))?;
        Ok(self.grid.numel() * size)
    }

    /// Dequantizes `fp8`, the weight's e4m3 bytes, into `out` in the model dtype as
    /// transformers loads it on CPU, and applies the plan's edits there (peft's merge in the
    /// model dtype).
    fn merge_into(&self, fp8: &[u8], out: &mut [u8]) -> Result<(), CheckpointError> {
        let scale_bytes = self.scale.bytes()?;
        let scales = decode_scales(self.scale.dtype(), &scale_bytes).map_err(|e| self.math(e))?;
        dequantize_fp8_into(fp8, &scales, &self.grid, self.dtype, out).map_err(|e| self.math(e))?;
        let shape = self.weight.shape();
        for step in &self.steps {
            step.apply(&self.key, self.dtype, shape, out, &self.opts, None)?;
        }
        Ok(())
    }

    /// The merged weight in the model dtype (`--dequantize`), in a pooled buffer.
    pub(crate) fn merged(&self) -> Result<Vec<u8>, CheckpointError> {
        let fp8 = self.weight.bytes()?;
        let mut out = buffers::take(self.merged_len()?);
        self.merge_into(&fp8, &mut out)?;
        if let Cow::Owned(buf) = fp8 {
            buffers::give(buf);
        }
        Ok(out)
    }

    /// Turns `fp8`, the base weight's e4m3 bytes, into the merged weight's, re-quantized as
    /// `Fp8Quantize` does, through one buffer in the model dtype; returns its inverse scales.
    /// The error is recorded.
    fn requantize(&self, requant: Requant, fp8: &mut [u8]) -> Result<Vec<f32>, CheckpointError> {
        let mut merged = buffers::take(self.merged_len()?);
        let mut inv_scales = vec![0.0f32; self.grid.scales()];
        let done = self.merge_into(fp8, &mut merged).and_then(|()| {
            let (dtype, grid, kind) = (self.dtype, &self.grid, requant.kind);
            quantize_fp8_into(&merged, dtype, grid, kind, fp8, &mut inv_scales)
                .map_err(|e| self.math(e))
        });
        buffers::give(merged);
        let max_abs_error = done?;
        if let Ok(mut errors) = self.shared.errors.lock() {
            errors.insert(self.key.clone(), max_abs_error);
        }
        Ok(inv_scales)
    }
}

/// A kept-FP8 weight is re-quantized over its base bytes; its one part is the scale, encoded
/// as the base stores it.
impl Joint for Fp8Weight {
    fn shared(&self) -> &JointSlot {
        &self.slot
    }

    fn base(&self) -> &Tensor {
        &self.weight
    }

    fn compute(&self, fp8: &mut [u8]) -> Result<Vec<Vec<u8>>, CheckpointError> {
        let requant = self.requant.ok_or_else(|| CheckpointError::TensorData {
            tensor: self.key.clone(),
            reason: "re-quantized, but written dequantized".into(),
        })?;
        let inv = self.requantize(requant, fp8)?;
        let scale = encode_scales(requant.scale_dtype, &inv).map_err(|e| self.math(e))?;
        Ok(vec![scale])
    }
}

/// Inverse scales as `f32`, as `Fp8Dequantize` reads them: floats widened, UE8M0 (`F8_E8M0`)
/// as powers of two, raw exponent bytes (`U8`) as `exp2(b - 127)` (255 overflows to infinity).
fn decode_scales(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, MergeMathError> {
    match dtype {
        Dtype::F8_E8M0 => Ok(bytes.iter().map(|&b| e8m0_to_f32(b)).collect()),
        Dtype::U8 => Ok(bytes
            .iter()
            .map(|&b| match b {
                0xff => f32::INFINITY,
                b => e8m0_to_f32(b),
            })
            .collect()),
        _ => decode_f32("weight_scale_inv", dtype, bytes),
    }
}

/// Inverse scales in the base's scale dtype: `F32`, or the biased exponent of each power of two
/// (`F8_E8M0`, or raw `U8` bytes), NaN as 255.
fn encode_scales(dtype: Dtype, inv: &[f32]) -> Result<Vec<u8>, MergeMathError> {
    match dtype {
        Dtype::F8_E8M0 | Dtype::U8 => Ok(inv
            .iter()
            .map(|x| match x.is_nan() {
                true => 0xff,
                false => ((x.to_bits() >> 23) & 0xff) as u8,
            })
            .collect()),
        _ => encode_f32("weight_scale_inv", dtype, inv),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 x 4 FP8 weight of 2 x 2 blocks, merged by nothing, re-quantized.
    fn weight(shared: Arc<Shared>) -> Fp8Weight {
        let q: Vec<u8> = (0..16u8).map(|i| i * 7).collect();
        let inv: Vec<u8> = [0.5f32, 0.25, 2.0, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let weight = Tensor::from_bytes(Dtype::F8_E4M3, vec![4, 4], q).unwrap();
        let scale = Tensor::from_bytes(Dtype::F32, vec![2, 2], inv).unwrap();
        let grid = Fp8Grid::new(&[4, 4], &[2, 2]).unwrap();
        let requant = Requant {
            kind: ScaleKind::F32,
            scale_dtype: Dtype::F32,
        };
        let parts = (weight, scale, grid);
        let opts = KernelOptions::default();
        Fp8Weight::new("w", parts, Some(requant), Dtype::BF16, vec![], opts, shared)
    }

    /// The weight's and the scale's bytes as the writer makes them, in either order.
    fn written(w: Fp8Weight, scale_first: bool) -> (Vec<u8>, Vec<u8>) {
        let w = Arc::new(w);
        let weight = super::super::joint::main_tensor(&w);
        let scale = super::super::joint::part_tensor(&w, 0, Dtype::F32, vec![2, 2]).unwrap();
        let bytes = |t: &Tensor| t.bytes().unwrap().into_owned();
        match scale_first {
            true => {
                let s = bytes(&scale);
                (bytes(&weight), s)
            }
            false => (bytes(&weight), bytes(&scale)),
        }
    }

    #[test]
    fn weight_and_scale_agree_in_either_order_and_budget() {
        let reference = written(weight(Arc::default()), false);
        for budget in [0, super::super::joint::KEEP_BUDGET] {
            let shared = Arc::new(Shared {
                budget: Arc::new(KeepBudget::new(budget)),
                ..Shared::default()
            });
            assert_eq!(written(weight(shared.clone()), true), reference);
            assert_eq!(shared.errors.lock().unwrap().len(), 1);
        }
    }

    #[test]
    fn scale_codecs_round_trip_powers_of_two() {
        let inv = [1.0f32, 0.5, 2f32.powi(-126), 2f32.powi(100)];
        for dtype in [Dtype::F8_E8M0, Dtype::U8] {
            let bytes = encode_scales(dtype, &inv).unwrap();
            assert_eq!(bytes, vec![127, 126, 1, 227]);
            assert_eq!(decode_scales(dtype, &bytes).unwrap(), inv.to_vec());
        }
        assert!(decode_scales(Dtype::F8_E8M0, &[255]).unwrap()[0].is_nan());
        assert_eq!(decode_scales(Dtype::U8, &[255]).unwrap()[0], f32::INFINITY);
    }
}
