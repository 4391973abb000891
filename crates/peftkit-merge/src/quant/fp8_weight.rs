//! One FP8 weight of a merge's output: dequantized, merged, and (format kept) re-quantized
//! together with its `weight_scale_inv`.
//!
//! The weight and its scale are two tensors of the output that come from one computation, a
//! [`Joint`] one (see `joint`): the weight is an edit of its base bytes, which are dequantized
//! band by band into the model dtype, merged there, and re-quantized back over themselves:
//! streamed from the base file to the output when the writer allows it and the steps are
//! plain Linear LoRA merges (`fp8_stream`), in memory otherwise; its scales are the
//! computation's one part.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use peftkit_checkpoint::{buffers, CheckpointError, Dtype, OutputRegion, SourceRegion, Tensor};

use super::fp8_stream::Stream;
use super::joint::{Joint, JointSlot, KeepBudget};
use crate::edit::{RowBanded, Step};
use crate::kernels::{
    decode_f32, dequantize_fp8_into, e8m0_to_f32, element_size, encode_f32, quantize_fp8_into,
    requantize_fp8_bands, Fp8Grid, MergeMathError, MergeOptions as KernelOptions, ScaleKind,
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
        let scales = self.scales()?;
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
    /// `Fp8Quantize` does, through the model dtype (band by band where the steps allow);
    /// returns its inverse scales. The error is recorded.
    fn requantize(&self, requant: Requant, fp8: &mut [u8]) -> Result<Vec<f32>, CheckpointError> {
        let mut inv_scales = vec![0.0f32; self.grid.scales()];
        let max_abs_error = match self.row_banded()? {
            Some(steps) => self.requantize_bands(&steps, requant, fp8, &mut inv_scales)?,
            None => self.requantize_whole(requant, fp8, &mut inv_scales)?,
        };
        self.record_error(max_abs_error);
        Ok(inv_scales)
    }

    /// [`Fp8Weight::requantize`] through one buffer of the whole weight in the model dtype.
    fn requantize_whole(
        &self,
        requant: Requant,
        fp8: &mut [u8],
        inv_scales: &mut [f32],
    ) -> Result<f64, CheckpointError> {
        let mut merged = buffers::take(self.merged_len()?);
        let done = self.merge_into(fp8, &mut merged).and_then(|()| {
            let (dtype, grid, kind) = (self.dtype, &self.grid, requant.kind);
            quantize_fp8_into(&merged, dtype, grid, kind, fp8, inv_scales).map_err(|e| self.math(e))
        });
        buffers::give(merged);
        done
    }

    /// Runs `steps` on `band`, rows `rows` of the weight in the model dtype.
    pub(super) fn merge_rows(
        &self,
        steps: &[RowBanded],
        rows: std::ops::Range<usize>,
        band: &mut [u8],
    ) -> Result<(), CheckpointError> {
        for step in steps {
            step.apply(
                &self.key,
                self.dtype,
                (rows.clone(), self.grid.cols),
                band,
                None,
            )?;
        }
        Ok(())
    }

    /// [`Fp8Weight::requantize`] through the whole weight in the model dtype, for tests to hold
    /// the other paths to: `fp8` becomes the re-quantized bytes; returns the inverse scales.
    #[cfg(test)]
    pub(super) fn requantize_whole_for_test(&self, requant: Requant, fp8: &mut [u8]) -> Vec<f32> {
        let mut inv = vec![0.0f32; self.grid.scales()];
        self.requantize_whole(requant, fp8, &mut inv).unwrap();
        inv
    }

    /// The steps as [`RowBanded`] ones, if the weight is 2-D and every step is one.
    pub(super) fn row_banded(&self) -> Result<Option<Vec<RowBanded>>, CheckpointError> {
        if self.grid.lead != 1 {
            return Ok(None);
        }
        RowBanded::all(&self.steps, &self.key, self.weight.shape(), &self.opts)
    }

    /// [`Fp8Weight::requantize`] one band of blocks at a time (see
    /// [`requantize_fp8_bands`]): a band in the model dtype per worker instead of the weight.
    fn requantize_bands(
        &self,
        steps: &[RowBanded],
        requant: Requant,
        fp8: &mut [u8],
        inv_scales: &mut [f32],
    ) -> Result<f64, CheckpointError> {
        let scales = self.scales()?;
        let merge = |rows, band: &mut [u8]| -> Result<(), Banded> {
            Ok(self.merge_rows(steps, rows, band)?)
        };
        let (grid, kind) = (&self.grid, requant.kind);
        requantize_fp8_bands(fp8, &scales, grid, self.dtype, kind, inv_scales, merge)
            .map_err(|e| self.banded(e))
    }

    /// The error of a step, or of the FP8 kernels, of a banded re-quantization.
    pub(super) fn banded(&self, e: Banded) -> CheckpointError {
        match e {
            Banded::Merge(e) => e,
            Banded::Math(e) => self.math(e),
        }
    }

    /// The weight's inverse scales, as `f32`.
    pub(super) fn scales(&self) -> Result<Vec<f32>, CheckpointError> {
        let bytes = self.scale.bytes()?;
        decode_scales(self.scale.dtype(), &bytes).map_err(|e| self.math(e))
    }

    /// Records the re-quantization error of the weight.
    pub(super) fn record_error(&self, max_abs_error: f64) {
        if let Ok(mut errors) = self.shared.errors.lock() {
            errors.insert(self.key.clone(), max_abs_error);
        }
    }
}

/// An error of [`Fp8Weight::requantize_bands`]: of a step, or of the FP8 kernels.
pub(super) enum Banded {
    Merge(CheckpointError),
    Math(MergeMathError),
}

impl From<MergeMathError> for Banded {
    fn from(e: MergeMathError) -> Self {
        Banded::Math(e)
    }
}

impl From<CheckpointError> for Banded {
    fn from(e: CheckpointError) -> Self {
        Banded::Merge(e)
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
        let requant = self.requant()?;
        let inv = self.requantize(requant, fp8)?;
        self.parts(requant, &inv)
    }

    /// Band by band from the base file to the output (`fp8_stream`), where the steps allow.
    fn stream(
        &self,
        source: SourceRegion<'_>,
        out: &OutputRegion<'_>,
    ) -> Result<Option<Vec<Vec<u8>>>, CheckpointError> {
        let requant = self.requant()?;
        // The output is e4m3: one byte per element.
        let Some(stream) = Stream::new(self, (source, out), 1)? else {
            return Ok(None);
        };
        let (inv, max_abs_error) = stream.requantize(requant)?;
        self.record_error(max_abs_error);
        self.parts(requant, &inv).map(Some)
    }
}

impl Fp8Weight {
    /// How the weight is re-quantized; an error for a weight written dequantized.
    fn requant(&self) -> Result<Requant, CheckpointError> {
        self.requant.ok_or_else(|| CheckpointError::TensorData {
            tensor: self.key.clone(),
            reason: "re-quantized, but written dequantized".into(),
        })
    }

    /// The parts of the joint computation: the inverse scales `inv`, encoded as the base
    /// stores them.
    fn parts(&self, requant: Requant, inv: &[f32]) -> Result<Vec<Vec<u8>>, CheckpointError> {
        let scale = encode_scales(requant.scale_dtype, inv).map_err(|e| self.math(e))?;
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
        let scale = super::super::joint::part_tensor(&w, "w", 0, Dtype::F32, vec![2, 2]).unwrap();
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
                budget: Arc::new(KeepBudget::new(budget, budget)),
                ..Shared::default()
            });
            assert_eq!(written(weight(shared.clone()), true), reference);
            assert_eq!(shared.errors.lock().unwrap().len(), 1);
        }
    }

    #[test]
    fn a_lora_or_dora_merged_band_by_band_is_the_whole_weight_merged() {
        use crate::edit::{Edit, LoraKind, ModuleTensors};
        // 384 x 256 (three bands of two 128 x 128 blocks), rank 4; factors large enough to move
        // the block maxima, so that every scale changes.
        let (rows, cols, r) = (384, 256, 4);
        let f32s = |n: usize, k: u32| -> Vec<u8> {
            (0..n as u32)
                .flat_map(|i| (((i * k) % 97) as f32 / 97.0 - 0.5).to_le_bytes())
                .collect()
        };
        let q: Vec<u8> = (0..rows * cols)
            .map(|i| (i * 37 % 251) as u8 & 0xf7)
            .collect();
        let inv: Vec<u8> = (0..6)
            .flat_map(|i| (0.01f32 * (i + 1) as f32).to_le_bytes())
            .collect();
        let weight = Tensor::from_bytes(Dtype::F8_E4M3, vec![rows, cols], q).unwrap();
        let scale = Tensor::from_bytes(Dtype::F32, vec![3, 2], inv).unwrap();
        let a = Tensor::from_bytes(Dtype::F32, vec![r, cols], f32s(r * cols, 13)).unwrap();
        let b = Tensor::from_bytes(Dtype::F32, vec![rows, r], f32s(rows * r, 29)).unwrap();
        let step = Step {
            adapter: std::path::Path::new("adapter").into(),
            edit: Edit::Lora {
                module: ModuleTensors::from_roles([("a", &a), ("b", &b)]),
                kind: LoraKind::Linear {
                    fan_in_fan_out: false,
                },
                scale: 2.0,
                dora: false,
                round_first: false,
            },
        };
        let grid = Fp8Grid::new(&[rows, cols], &[3, 2]).unwrap();
        let requant = Requant {
            kind: ScaleKind::F32,
            scale_dtype: Dtype::F32,
        };
        // Two plain steps, then a DoRA step (whose norm is taken per row, so it runs by bands
        // too), each against the whole weight.
        let m = Tensor::from_bytes(Dtype::F32, vec![rows], f32s(rows, 7)).unwrap();
        let mut dora = step.clone();
        if let Edit::Lora {
            dora: d, module, ..
        } = &mut dora.edit
        {
            *d = true;
            *module = ModuleTensors::from_roles([("a", &a), ("b", &b), ("magnitude", &m)]);
        }
        for steps in [vec![step.clone(); 2], vec![dora]] {
            let w = Fp8Weight::new(
                "w",
                (weight.clone(), scale.clone(), grid),
                Some(requant),
                Dtype::BF16,
                steps,
                KernelOptions::default(),
                Arc::default(),
            );
            let steps = w
                .row_banded()
                .unwrap()
                .expect("Linear LoRA and DoRA steps run by bands");
            let base = weight.bytes().unwrap().into_owned();
            let (mut banded, mut whole) = (base.clone(), base.clone());
            let (mut inv_b, mut inv_w) = (vec![0f32; 6], vec![0f32; 6]);
            let err_b = w
                .requantize_bands(&steps, requant, &mut banded, &mut inv_b)
                .unwrap();
            let err_w = w.requantize_whole(requant, &mut whole, &mut inv_w).unwrap();
            assert!(banded != base && inv_w.iter().all(|&x| x != 0.0));
            assert_eq!(
                (banded, inv_b, err_b.to_bits()),
                (whole, inv_w, err_w.to_bits())
            );
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
