//! One FP8 weight of a merge's output: dequantized, merged, and (format kept) re-quantized
//! together with its `weight_scale_inv`.
//!
//! The weight and its scale are two tensors of the output, written by whichever worker reaches
//! each first, in file order, and a file lists its `F32` scales before its `F8_E4M3` weights.
//! Both come from one computation: the first to run computes it and leaves what the other
//! needs in a shared slot (the scales: a few bytes; the quantized weight: one byte per element,
//! kept only within [`KEEP_BUDGET`] bytes for the whole merge, beyond which the weight's own
//! write computes the merge again), so memory stays bounded whatever the layout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use peftkit_checkpoint::{CheckpointError, Dtype, Tensor};

use crate::edit::Step;
use crate::kernels::{
    decode_f32, dequantize_fp8, e8m0_to_f32, encode_f32, quantize_fp8, Fp8Grid, Fp8Quantized,
    MergeMathError, MergeOptions as KernelOptions, ScaleKind,
};

/// Bytes of re-quantized weights a merge keeps for their later write.
pub(crate) const KEEP_BUDGET: usize = 128 << 20;

/// How a merged weight is written back in FP8.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Requant {
    /// `scale_fmt`.
    pub kind: ScaleKind,
    /// The dtype the base stores the scale in (kept).
    pub scale_dtype: Dtype,
}

/// What one merge shares between its FP8 weights: their errors and the keep budget.
pub(crate) struct Shared {
    /// Re-quantization error of each weight, recorded when computed.
    pub errors: Mutex<BTreeMap<String, f64>>,
    /// Bytes of the keep budget in use.
    kept: AtomicUsize,
    /// The budget ([`KEEP_BUDGET`]).
    budget: usize,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            errors: Mutex::default(),
            kept: AtomicUsize::new(0),
            budget: KEEP_BUDGET,
        }
    }
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
    /// The result of the first computation, for the other tensor (see the module docs).
    slot: Mutex<Option<Fp8Quantized>>,
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
            shared,
            slot: Mutex::new(None),
        }
    }

    pub(crate) fn math(&self, e: MergeMathError) -> CheckpointError {
        CheckpointError::TensorCompute {
            tensor: self.key.clone(),
            context: "dequantizing FP8".into(),
            source: Box::new(e),
        }
    }

    /// The weight in the model dtype, as transformers loads it on CPU.
    fn dequantized(&self) -> Result<Vec<u8>, CheckpointError> {
        let scale_bytes = self.scale.bytes()?;
        let scales = decode_scales(self.scale.dtype(), &scale_bytes).map_err(|e| self.math(e))?;
        let weight = self.weight.bytes()?;
        let values = dequantize_fp8(&weight, &scales, &self.grid).map_err(|e| self.math(e))?;
        encode_f32("fp8 weight", self.dtype, &values).map_err(|e| self.math(e))
    }

    /// The dequantized weight with the plan's edits applied (peft's merge in the model dtype).
    fn merged(&self) -> Result<Vec<u8>, CheckpointError> {
        let mut data = self.dequantized()?;
        let shape = self.weight.shape();
        for step in &self.steps {
            step.apply(&self.key, self.dtype, shape, &mut data, &self.opts, None)?;
        }
        Ok(data)
    }

    /// The merged weight re-quantized as `Fp8Quantize` does; its error is recorded.
    fn requantized(&self, requant: Requant) -> Result<Fp8Quantized, CheckpointError> {
        let merged = self.merged()?;
        let values = decode_f32("merged weight", self.dtype, &merged).map_err(|e| self.math(e))?;
        let q = quantize_fp8(&values, &self.grid, requant.kind).map_err(|e| self.math(e))?;
        if let Ok(mut errors) = self.shared.errors.lock() {
            errors.insert(self.key.clone(), q.max_abs_error);
        }
        Ok(q)
    }

    /// What the slot holds, taken out (its bytes leave the keep budget).
    fn take(&self) -> Option<Fp8Quantized> {
        let q = self.slot.lock().ok()?.take()?;
        self.shared
            .kept
            .fetch_sub(q.weight.len(), Ordering::Relaxed);
        Some(q)
    }

    /// Leaves `q` for the other tensor if the budget allows its weight bytes.
    fn keep(&self, q: Fp8Quantized) {
        let n = q.weight.len();
        let budget = &self.shared.kept;
        if budget.fetch_add(n, Ordering::Relaxed) + n > self.shared.budget {
            budget.fetch_sub(n, Ordering::Relaxed);
            return;
        }
        match self.slot.lock() {
            Ok(mut slot) if slot.is_none() => *slot = Some(q),
            _ => {
                budget.fetch_sub(n, Ordering::Relaxed);
            }
        }
    }

    /// The bytes written for the weight.
    pub(crate) fn weight_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let Some(requant) = self.requant else {
            return self.merged();
        };
        if let Some(q) = self.take().filter(|q| !q.weight.is_empty()) {
            return Ok(q.weight);
        }
        let mut q = self.requantized(requant)?;
        let weight = std::mem::take(&mut q.weight);
        self.keep(q); // the scales, for the scale's write
        Ok(weight)
    }

    /// The bytes written for the scale, encoded as `requant` says.
    pub(crate) fn scale_bytes(&self, requant: Requant) -> Result<Vec<u8>, CheckpointError> {
        let inv = match self.take() {
            Some(q) => q.inv_scales,
            None => {
                let q = self.requantized(requant)?;
                let inv = q.inv_scales.clone();
                self.keep(q); // the weight, for the weight's write
                inv
            }
        };
        encode_scales(requant.scale_dtype, &inv).map_err(|e| self.math(e))
    }
}

impl Drop for Fp8Weight {
    fn drop(&mut self) {
        // A result nobody took (both tensors computed it at once) leaves the budget.
        self.take();
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

    #[test]
    fn weight_and_scale_agree_in_either_order_and_budget() {
        let requant = |w: &Fp8Weight| w.requant.unwrap();
        // Weight first (the scales are kept for the scale), then scale first, kept or not.
        let reference = weight(Arc::default());
        let w_first = reference.weight_bytes().unwrap();
        let s_second = reference.scale_bytes(requant(&reference)).unwrap();
        for budget in [0, KEEP_BUDGET] {
            let shared = Arc::new(Shared {
                budget,
                ..Shared::default()
            });
            let w = weight(shared.clone());
            let s = w.scale_bytes(requant(&w)).unwrap();
            let kept = shared.kept.load(Ordering::Relaxed);
            assert_eq!(kept, if budget == 0 { 0 } else { 16 });
            assert_eq!(
                (w.weight_bytes().unwrap(), s),
                (w_first.clone(), s_second.clone())
            );
            assert_eq!(
                shared.kept.load(Ordering::Relaxed),
                0,
                "taken out of the budget"
            );
        }
        assert_eq!(reference.shared.errors.lock().unwrap().len(), 1);
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
