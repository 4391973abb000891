//! Merging into transformers' fine-grained FP8 bases (`quant_method: "fp8"`): `float8_e4m3fn`
//! weights with a block-scaled `weight_scale_inv` beside each.
//!
//! A targeted weight is dequantized to the model dtype exactly as transformers loads it on CPU
//! (`Fp8Dequantize`), merged by the usual kernels (peft's bf16 merge), then either written in
//! the model dtype (`--dequantize`, as transformers' `save_pretrained` of that model writes it)
//! or re-quantized as `Fp8Quantize` does, with a new `weight_scale_inv`. Everything else is
//! copied byte for byte, except that `--dequantize` writes every FP8 weight in the model dtype
//! and drops the scales.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use peftkit_checkpoint::{dtype_name, Checkpoint, Dtype, ModelConfig, Tensor};
use serde_json::Value;

use crate::edit::Step;
use crate::error::MergeError;
use crate::kernels::{Fp8Grid, MergeOptions as KernelOptions, ScaleKind};
use crate::quant::fp8_stream::Dequantized;
use crate::quant::fp8_weight::{Fp8Weight, Requant, Shared};
use crate::quant::joint::{main_tensor, part_tensor};

/// `FineGrainedFP8Config`'s default `weight_block_size`, used when the config omits it.
const DEFAULT_BLOCK: (usize, usize) = (128, 128);

/// The format of an FP8 base, from its `quantization_config` and `dtype`.
#[derive(Debug, Clone)]
pub(crate) struct Fp8Format {
    /// `weight_block_size` (`None`: one scale per matrix).
    block: Option<(usize, usize)>,
    /// `scale_fmt`.
    kind: ScaleKind,
    /// The model dtype transformers dequantizes to (`config.json`'s `dtype`).
    pub dtype: Dtype,
}

impl Fp8Format {
    /// Reads the format of the base in `base_dir` from its `config`.
    pub(crate) fn read(base_dir: &Path, config: &ModelConfig) -> Result<Self, MergeError> {
        let bad = |reason: String| MergeError::Fp8Layout {
            base: base_dir.to_owned(),
            tensor: "quantization_config".into(),
            reason,
        };
        let q = config.quantization_config().cloned().unwrap_or_default();
        let block = match q.get("weight_block_size") {
            None => Some(DEFAULT_BLOCK),
            Some(Value::Null) => None,
            Some(v) => Some(block_size(v).ok_or_else(|| {
                bad(format!(
                    "weight_block_size {v} is not two positive integers"
                ))
            })?),
        };
        let kind = match q
            .get("scale_fmt")
            .and_then(Value::as_str)
            .unwrap_or("float")
        {
            "float" => ScaleKind::F32,
            "ue8m0" => ScaleKind::Ue8m0,
            other => return Err(bad(format!("scale_fmt `{other}` is not float or ue8m0"))),
        };
        // Without a dtype in config.json transformers takes the first floating-point tensor's
        // dtype in its state dict, which for an FP8 checkpoint depends on its file order.
        let dtype = match config.dtype() {
            Some("bfloat16") => Dtype::BF16,
            Some("float16") => Dtype::F16,
            Some("float32") => Dtype::F32,
            Some(other) => {
                return Err(bad(format!(
                    "the model dtype `{other}` is not a float dtype transformers dequantizes FP8 to"
                )))
            }
            None => {
                return Err(bad(
                    "config.json has no dtype, the model dtype FP8 weights dequantize to; add \"dtype\": \"bfloat16\" (what the weights were trained in)".into(),
                ))
            }
        };
        Ok(Fp8Format { block, kind, dtype })
    }
}

/// `[rows, cols]`, both positive.
fn block_size(v: &Value) -> Option<(usize, usize)> {
    let dims: Vec<usize> = v
        .as_array()?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()?;
    match dims[..] {
        [r, c] if r > 0 && c > 0 => Some((r, c)),
        _ => None,
    }
}

/// The names a weight's inverse scale may go by: transformers' own, then those it renames to
/// it on load (DeepSeek-V4's `.scale`, Mistral's `.qscale_weight`), each with whether it needs
/// the weight to be F8_E4M3 to count (a norm's `.scale` beside its `.weight` is no FP8 scale).
/// Only `*.weight` parameters: transformers' CPU load ignores the scale of any other FP8
/// parameter (fused `experts.gate_up_proj_scale_inv` is an unexpected key, the e4m3 values are
/// read unscaled), so such tensors have no reference and are refused where decoded.
fn scale_names(weight: &str) -> Vec<(String, bool)> {
    let Some(module) = weight.strip_suffix(".weight") else {
        return vec![];
    };
    [
        ("weight_scale_inv", false),
        ("scale", true),
        ("qscale_weight", true),
    ]
    .iter()
    .map(|(s, needs_fp8)| (format!("{module}.{s}"), *needs_fp8))
    .collect()
}

/// What the merge writes for one base tensor of an FP8 base.
pub(crate) enum Treatment {
    /// As any base tensor: copied, or merged in its own dtype.
    Plain,
    /// Not written (a scale, with `--dequantize`).
    Dropped,
    /// Computed when written: a dequantized weight, or (`changed`) one the adapters change or
    /// its re-quantized scale.
    Computed { tensor: Tensor, changed: bool },
}

/// An FP8 base's tensors as one merge writes them.
pub(crate) struct Fp8Base<'a> {
    base: &'a Checkpoint,
    dir: PathBuf,
    format: Fp8Format,
    dequantize: bool,
    /// Scale name to weight name, for every weight that has a scale.
    weight_of: BTreeMap<String, String>,
    /// The weights decoded so far, by name: a weight and its scale share one.
    weights: Mutex<BTreeMap<String, Arc<Fp8Weight>>>,
    /// What the weights share (their errors, the keep budget).
    shared: Arc<Shared>,
}

impl<'a> Fp8Base<'a> {
    /// The FP8 view of `base` (in `dir`), written in `format` or dequantized.
    pub(crate) fn new(
        base: &'a Checkpoint,
        dir: &Path,
        format: Fp8Format,
        dequantize: bool,
    ) -> Self {
        let weight_of = base
            .tensors()
            .filter_map(|(name, t)| {
                let fp8 = t.dtype() == Dtype::F8_E4M3;
                let (scale, _) = scale_names(name)
                    .into_iter()
                    .find(|(s, needs_fp8)| base.get(s).is_some() && (fp8 || !needs_fp8))?;
                Some((scale, name.to_owned()))
            })
            .collect();
        Fp8Base {
            base,
            dir: dir.to_owned(),
            format,
            dequantize,
            weight_of,
            weights: Mutex::default(),
            shared: Arc::default(),
        }
    }

    /// How many weights have a scale (each is written dequantized with `--dequantize`).
    pub(crate) fn weights(&self) -> usize {
        self.weight_of.len()
    }

    /// The re-quantization errors recorded so far (complete once the output is written).
    pub(crate) fn errors(&self) -> BTreeMap<String, f64> {
        let errors = self.shared.errors.lock();
        errors.map(|e| e.clone()).unwrap_or_default()
    }

    /// What to write for base tensor `name`, the plan's edits being `steps` (by base tensor).
    /// Refuses, before anything is written, a tensor that would need decoding and cannot be.
    pub(crate) fn treat(
        &self,
        name: &str,
        tensor: &Tensor,
        steps: &IndexMap<String, Vec<Step>>,
        opts: &KernelOptions,
    ) -> Result<Treatment, MergeError> {
        if let Some(weight) = self.weight_of.get(name) {
            return self.treat_scale(name, tensor, weight, steps, opts);
        }
        if self.dequantize && name.ends_with(".activation_scale") {
            return Ok(Treatment::Dropped);
        }
        let scale = scale_names(name)
            .into_iter()
            .map(|(s, _)| s)
            .find(|s| self.weight_of.get(s).is_some_and(|w| w == name));
        let touched = steps.get(name);
        let needs_decoding = touched.is_some() || (self.dequantize && scale.is_some());
        if !needs_decoding || (scale.is_none() && tensor.dtype() != Dtype::F8_E4M3) {
            return Ok(Treatment::Plain);
        }
        let weight = self.weight(name, tensor, scale, touched, opts)?;
        let computed = match weight.requant {
            // Re-quantized over its own base bytes, where the writer copied them.
            Some(_) => main_tensor(&weight),
            // Another dtype: computed where it is written, chunk by chunk (`fp8_stream`).
            None => Tensor::streamed(
                self.format.dtype,
                tensor.shape().to_vec(),
                Dequantized(weight),
            )?,
        };
        Ok(Treatment::Computed {
            tensor: computed,
            changed: touched.is_some(),
        })
    }

    /// Scale `name` of `weight`: dropped with `--dequantize`, recomputed with its weight when
    /// that is re-quantized (one computation serves both, see `fp8_weight`), else copied.
    fn treat_scale(
        &self,
        name: &str,
        tensor: &Tensor,
        weight: &str,
        steps: &IndexMap<String, Vec<Step>>,
        opts: &KernelOptions,
    ) -> Result<Treatment, MergeError> {
        if self.dequantize {
            return Ok(Treatment::Dropped);
        }
        let (Some(touched), Some(weight_tensor)) = (steps.get(weight), self.base.get(weight))
        else {
            return Ok(Treatment::Plain);
        };
        let w = self.weight(
            weight,
            weight_tensor,
            Some(name.to_owned()),
            Some(touched),
            opts,
        )?;
        // After its weight, which leaves the scales behind (see `joint`).
        let scale = part_tensor(&w, weight, 0, tensor.dtype(), tensor.shape().to_vec())?;
        Ok(Treatment::Computed {
            tensor: scale,
            changed: true,
        })
    }

    /// The FP8 weight `name` with its scale `scale`, checked; one per weight.
    fn weight(
        &self,
        name: &str,
        tensor: &Tensor,
        scale: Option<String>,
        steps: Option<&Vec<Step>>,
        opts: &KernelOptions,
    ) -> Result<Arc<Fp8Weight>, MergeError> {
        if let Some(w) = self.weights.lock().ok().and_then(|w| w.get(name).cloned()) {
            return Ok(w);
        }
        let w = Arc::new(self.new_weight(name, tensor, scale, steps, opts)?);
        if let Ok(mut weights) = self.weights.lock() {
            weights.insert(name.to_owned(), w.clone());
        }
        Ok(w)
    }

    /// [`Self::weight`], built.
    fn new_weight(
        &self,
        name: &str,
        tensor: &Tensor,
        scale: Option<String>,
        steps: Option<&Vec<Step>>,
        opts: &KernelOptions,
    ) -> Result<Fp8Weight, MergeError> {
        let bad = |reason: String| MergeError::Fp8Layout {
            base: self.dir.clone(),
            tensor: name.to_owned(),
            reason,
        };
        let scale_name = scale.ok_or_else(|| {
            bad("an F8_E4M3 tensor without a `<module>.weight_scale_inv` beside its `<module>.weight` (FP8 parameters not named `.weight`, such as fused experts, are loaded unscaled by transformers: no reference to reproduce)".into())
        })?;
        if tensor.dtype() != Dtype::F8_E4M3 {
            return Err(bad(format!(
                "has a scale but dtype {}; only F8_E4M3 weights can be dequantized (FP4-packed experts are not supported)",
                dtype_name(tensor.dtype())
            )));
        }
        let scale = self
            .base
            .get(&scale_name)
            .cloned()
            .ok_or_else(|| bad(format!("its scale {scale_name} is not in the base")))?;
        let grid = Fp8Grid::new(tensor.shape(), scale.shape()).map_err(|_| {
            bad(format!(
                "its scale {scale_name} {:?} is not a grid of whole blocks of the weight {:?}; transformers 5.24 cannot dequantize it either",
                scale.shape(),
                tensor.shape()
            ))
        })?;
        let requant = if self.dequantize {
            None
        } else {
            Some(
                self.requant_format(name, tensor, &scale, grid)
                    .map_err(bad)?,
            )
        };
        Ok(Fp8Weight::new(
            name,
            (tensor.clone(), scale, grid),
            requant,
            self.format.dtype,
            steps.cloned().unwrap_or_default(),
            *opts,
            self.shared.clone(),
        ))
    }

    /// How a merged weight is re-quantized: the base's grid must be the one `Fp8Quantize`
    /// cuts with `weight_block_size`, and its scales stored as `scale_fmt` says.
    fn requant_format(
        &self,
        name: &str,
        tensor: &Tensor,
        scale: &Tensor,
        grid: Fp8Grid,
    ) -> Result<Requant, String> {
        if Fp8Grid::for_block(tensor.shape(), self.format.block) != Some(grid) {
            return Err(format!(
                "its blocks {:?} are not quantization_config.weight_block_size {:?}; re-quantizing {name} would change its layout (merge with --dequantize instead)",
                grid.block(),
                self.format.block
            ));
        }
        let fits = match self.format.kind {
            ScaleKind::F32 => scale.dtype() == Dtype::F32,
            ScaleKind::Ue8m0 => matches!(scale.dtype(), Dtype::F8_E8M0 | Dtype::U8),
        };
        if !fits {
            return Err(format!(
                "its scale is {} but scale_fmt is {:?}; re-quantizing would change its format (merge with --dequantize instead)",
                dtype_name(scale.dtype()),
                self.format.kind
            ));
        }
        Ok(Requant {
            kind: self.format.kind,
            scale_dtype: scale.dtype(),
        })
    }
}
