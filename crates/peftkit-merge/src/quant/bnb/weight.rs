//! A 4-bit weight of a pre-quantized bitsandbytes checkpoint: the tensors transformers writes
//! for it, found by name, dequantized, and re-quantized.
//!
//! For a weight `W` (`….weight`), transformers 5.24 writes `W` (the packed nibbles, U8 `(n/2, 1)`),
//! `W.absmax` (F32 per block, or U8 codes with double quantization), `W.quant_map` (the 16-value
//! code), with double quantization `W.nested_absmax` and `W.nested_quant_map`, and
//! `W.quant_state.bitsandbytes__nf4|fp4` (the JSON of [`QuantState`]).

use std::ops::Range;

use peftkit_checkpoint::{Checkpoint, CheckpointError, Dtype, Tensor};

use super::banded::{rows_per_band, BandSource, Dequantize, StoredBytes};
use super::host_avx512;
use super::state::{torch_name, QuantState};
use super::view::compute_error;
use crate::edit::Requantizer;
use crate::kernels::{
    bnb_dequantize_4bit, bnb_dequantize_4bit_into, bnb_dequantize_blockwise, bnb_quantize_4bit,
    bnb_quantize_4bit_into, bnb_quantize_blockwise, decode_f32, encode_f32, round_slice_to,
    torch_mean_f32, Code4,
};

/// The prefix of the quantization-state tensor's suffix; the 4-bit type follows it.
pub(crate) const STATE_PREFIX: &str = ".quant_state.bitsandbytes__";
const ABSMAX: &str = ".absmax";
const QUANT_MAP: &str = ".quant_map";
const NESTED_ABSMAX: &str = ".nested_absmax";
const NESTED_QUANT_MAP: &str = ".nested_quant_map";

/// One 4-bit weight and the handles of its tensors.
#[derive(Clone)]
pub(crate) struct Weight4 {
    /// The weight's name (`….weight`), which holds the packed nibbles.
    pub name: String,
    pub state: QuantState,
    state_key: String,
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested: Option<(Tensor, Tensor)>,
}

/// A problem with one weight's tensors.
pub(crate) struct PartError {
    pub tensor: String,
    pub reason: String,
}

impl Weight4 {
    /// Every 4-bit weight of `base` (those with a quantization-state tensor), in file order.
    pub fn find_all(base: &Checkpoint) -> Result<Vec<Weight4>, PartError> {
        base.tensors()
            .filter_map(|(key, _)| {
                let (name, kind) = key.split_once(STATE_PREFIX)?;
                Some((key, name, kind))
            })
            .map(|(key, name, _)| Self::open(base, key, name))
            .collect()
    }

    fn open(base: &Checkpoint, state_key: &str, name: &str) -> Result<Self, PartError> {
        let err = |tensor: &str, reason: String| PartError {
            tensor: tensor.to_owned(),
            reason,
        };
        let part = |suffix: &str| {
            let key = format!("{name}{suffix}");
            base.get(&key).cloned().ok_or_else(|| {
                err(
                    &key,
                    format!("missing: a 4-bit weight `{name}` needs it beside its quant_state"),
                )
            })
        };
        let state_tensor = part(&state_key[name.len()..])?;
        let bytes = state_tensor
            .bytes()
            .map_err(|e| err(state_key, e.to_string()))?;
        let state = QuantState::parse(&bytes).map_err(|e| err(state_key, e))?;
        let nested = match state.nested() {
            true => Some((part(NESTED_ABSMAX)?, part(NESTED_QUANT_MAP)?)),
            false => None,
        };
        let packed = part("")?;
        if packed.dtype() != Dtype::U8 {
            let why = format!(
                "dtype {:?}: only uint8 quant_storage is supported",
                packed.dtype()
            );
            return Err(err(name, why));
        }
        Ok(Weight4 {
            name: name.to_owned(),
            state,
            state_key: state_key.to_owned(),
            packed,
            absmax: part(ABSMAX)?,
            quant_map: part(QUANT_MAP)?,
            nested,
        })
    }

    /// The names of the tensors stored beside the weight (not the weight itself).
    pub fn part_names(&self) -> Vec<String> {
        let mut names = vec![
            format!("{}{ABSMAX}", self.name),
            format!("{}{QUANT_MAP}", self.name),
        ];
        if self.nested.is_some() {
            names.push(format!("{}{NESTED_ABSMAX}", self.name));
            names.push(format!("{}{NESTED_QUANT_MAP}", self.name));
        }
        names.push(self.state_key.clone());
        names
    }

    /// The dtype dequantization returns.
    pub fn dtype(&self) -> Dtype {
        self.state.weight_dtype().unwrap_or(Dtype::F32)
    }

    /// The 4-bit code of this weight (its `quant_map`).
    pub fn code(&self) -> Result<Code4, Box<dyn std::error::Error + Send + Sync>> {
        let values: [f32; 16] = f32s(&self.quant_map)?
            .try_into()
            .map_err(|_| "quant_map must hold 16 values")?;
        Ok(Code4::new(self.state.kind()?, values))
    }

    /// The nested code (`nested_quant_map`), for a double-quantized weight.
    pub fn nested_code(
        &self,
    ) -> Result<Option<[f32; 256]>, Box<dyn std::error::Error + Send + Sync>> {
        let Some((_, map)) = &self.nested else {
            return Ok(None);
        };
        let values: [f32; 256] = f32s(map)?
            .try_into()
            .map_err(|_| "nested_quant_map must hold 256 values")?;
        Ok(Some(values))
    }

    /// The absmax per block, as `f32` (double quantization undone: codes times their scales,
    /// plus the offset).
    fn absmax(&self) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        let (Some((nested_absmax, _)), Some(offset), Some(bs)) = (
            &self.nested,
            self.state.nested_offset,
            self.state.nested_blocksize,
        ) else {
            return f32s(&self.absmax);
        };
        let code = self.nested_code()?.ok_or("nested_quant_map missing")?;
        let q = self.absmax.bytes()?;
        let scales = f32s(nested_absmax)?;
        let mut absmax = bnb_dequantize_blockwise(&q, &scales, &code, bs)?;
        let offset = offset as f32;
        absmax.iter_mut().for_each(|a| *a += offset);
        Ok(absmax)
    }

    /// `dequantize_4bit`: the weight's values as `f32`, before the rounding to [`Self::dtype`],
    /// into `out` (which holds exactly as many).
    pub fn dequantize_into(
        &self,
        avx512: bool,
        out: &mut [f32],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let packed = self.packed.bytes()?;
        let absmax = self.absmax()?;
        let code = self.code()?;
        let geometry = (self.state.blocksize, self.state.shape.as_slice(), avx512);
        Ok(bnb_dequantize_4bit_into(
            &packed, &absmax, &code, geometry, out,
        )?)
    }

    /// The packed bytes bitsandbytes writes when it quantizes `values` (a merged weight of
    /// `dtype`, widened to `f32`) with this weight's settings, into `packed`, and the tensors
    /// stored beside them: peft's merge hands it `W + Δ` in `f32` (a DoRA result in the
    /// dequantized dtype), which the stored dtype becomes. `threads` is torch's thread count
    /// (for the nested mean).
    pub fn requantize_into(
        &self,
        values: &[f32],
        (dtype, threads): (Dtype, usize),
        packed: &mut [u8],
    ) -> Result<Scales4, Box<dyn std::error::Error + Send + Sync>> {
        let code = self.code()?;
        let mut absmax = vec![0f32; values.len().div_ceil(self.state.blocksize.max(1))];
        bnb_quantize_4bit_into(values, self.state.blocksize, &code, packed, &mut absmax)?;
        self.scales(absmax, dtype, threads)
    }

    /// The tensors stored beside the packed bytes of this weight re-quantized to `dtype`, from
    /// its new block maxima: `absmax` as they are or, with double quantization, as 8-bit codes
    /// of their difference from their torch mean (`threads`: torch's thread count), with
    /// `nested_absmax`; and the quantization state.
    pub fn scales(
        &self,
        absmax: Vec<f32>,
        dtype: Dtype,
        threads: usize,
    ) -> Result<Scales4, Box<dyn std::error::Error + Send + Sync>> {
        let (absmax, nested_absmax, offset) =
            match (self.nested_code()?, self.state.nested_blocksize) {
                (Some(nested_code), Some(bs)) => {
                    let offset = torch_mean_f32(&absmax, threads);
                    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
                    let (q, scales) = bnb_quantize_blockwise(&centred, &nested_code, bs);
                    let nested = encode_f32("nested_absmax", Dtype::F32, &scales)?;
                    (q, Some(nested), Some(f64::from(offset)))
                }
                _ => (encode_f32("absmax", Dtype::F32, &absmax)?, None, None),
            };
        Ok(Scales4 {
            absmax,
            nested_absmax,
            state: self.requantized_state(dtype, offset)?,
        })
    }

    /// Rows per band ([`rows_per_band`]), if this weight can be merged band by band
    /// ([`Stored4`]): 2-D, each row whole blocks of an even size. Then every one of
    /// bitsandbytes' dequantization kernels reads a band's scales at the band's own blocks (the
    /// per-row AVX-512 kernel included), and a band quantizes to its own bytes and blocks.
    pub fn band_rows(&self) -> Option<usize> {
        let (&[_, cols], bs) = (self.state.shape.as_slice(), self.state.blocksize) else {
            return None;
        };
        let whole_blocks = bs > 0 && bs % 2 == 0 && cols > 0 && cols % bs == 0;
        whole_blocks.then(|| rows_per_band(cols))
    }

    /// The stored codes (read a band at a time) and scales, for
    /// [`Stored4::dequantize_rows`]. `avx512`: the dequantizer's host rule.
    pub fn stored(
        &self,
        avx512: bool,
    ) -> Result<Stored4<'_>, Box<dyn std::error::Error + Send + Sync>> {
        let cols = self.state.shape.last().copied().unwrap_or(1).max(1);
        Ok(Stored4 {
            name: &self.name,
            packed: StoredBytes::of(&self.name, &self.packed)?,
            absmax: self.absmax()?,
            code: self.code()?,
            blocksize: self.state.blocksize,
            cols,
            avx512,
        })
    }

    /// The quantization state's JSON once this weight holds a re-quantized `dtype` sum whose
    /// block absmax have the mean `offset` (double quantization; `None` without).
    pub fn requantized_state(
        &self,
        dtype: Dtype,
        offset: Option<f64>,
    ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        let mut state = self.state.clone();
        state.dtype = torch_name(dtype)
            .ok_or_else(|| format!("{dtype:?} is not a dtype bitsandbytes stores"))?
            .to_owned();
        if state.nested() {
            state.nested_offset = Some(offset.ok_or("a nested state without its offset")?);
        }
        Ok(state.to_json())
    }

    /// What this weight holds after peft re-quantizes `values` into it and dequantizes it
    /// again for the next adapter: bitsandbytes' round trip with the weight's own settings and
    /// code tables, in `f32` (the re-quantized weight's dtype).
    pub fn round_trip(
        &self,
        values: &[f32],
        threads: usize,
        avx512: bool,
    ) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        let nested_code = self.nested_code()?;
        let nested = nested_code.as_ref().zip(self.state.nested_blocksize);
        let settings = RoundTrip4 {
            code: self.code()?,
            blocksize: self.state.blocksize,
            nested,
        };
        settings.run(values, &self.state.shape, threads, avx512)
    }

    /// The name of each tensor a re-quantization writes (the packed weight, [`Scales4`]), and
    /// which part it is.
    pub fn requantized_parts(&self) -> Vec<(String, Part)> {
        let mut parts = vec![
            (self.name.clone(), Part::Packed),
            (format!("{}{ABSMAX}", self.name), Part::Absmax),
            (self.state_key.clone(), Part::State),
        ];
        if self.nested.is_some() {
            parts.push((format!("{}{NESTED_ABSMAX}", self.name), Part::NestedAbsmax));
        }
        parts
    }

    /// The packed weight's handle (its shape is kept by re-quantization).
    pub fn shape_of(&self, part: Part) -> Vec<usize> {
        match part {
            Part::Packed => self.packed.shape().to_vec(),
            Part::Absmax => self.absmax.shape().to_vec(),
            Part::NestedAbsmax => self
                .nested
                .as_ref()
                .map(|(t, _)| t.shape().to_vec())
                .unwrap_or_default(),
            Part::State => vec![],
        }
    }
}

/// How bitsandbytes quantizes a weight to 4 bits: the code, the block size, and with double
/// quantization the 8-bit code of the block scales and its block size.
pub(super) struct RoundTrip4<'a> {
    pub code: Code4,
    pub blocksize: usize,
    pub nested: Option<(&'a [f32; 256], usize)>,
}

impl RoundTrip4<'_> {
    /// `dequantize_4bit(quantize_4bit(values))` in `f32`, before any rounding to a dtype: with
    /// double quantization the block scales, less their torch mean (`threads`: torch's), go
    /// through the 8-bit code too. `avx512`: the dequantizer's host rule.
    pub fn run(
        &self,
        values: &[f32],
        shape: &[usize],
        threads: usize,
        avx512: bool,
    ) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        let (packed, absmax) = bnb_quantize_4bit(values, self.blocksize, &self.code);
        let absmax = self.stored_absmax(absmax, threads)?;
        Ok(bnb_dequantize_4bit(
            &packed,
            &absmax,
            &self.code,
            self.blocksize,
            shape,
            avx512,
        )?)
    }
}

impl RoundTrip4<'_> {
    /// The block maxima dequantization reads back for `absmax` (a weight's, as quantized):
    /// as they are, or with double quantization through the 8-bit code, less their torch mean
    /// (`threads`: torch's) and plus it again.
    pub fn stored_absmax(
        &self,
        mut absmax: Vec<f32>,
        threads: usize,
    ) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        let Some((nested_code, bs)) = self.nested else {
            return Ok(absmax);
        };
        let offset = torch_mean_f32(&absmax, threads);
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let (codes8, scales) = bnb_quantize_blockwise(&centred, nested_code, bs);
        absmax = bnb_dequantize_blockwise(&codes8, &scales, nested_code, bs)?;
        absmax.iter_mut().for_each(|a| *a += offset);
        Ok(absmax)
    }
}

/// A 4-bit weight after peft stored one adapter's result in it (`Params4bit(w_data)`): the
/// result cast to the `dtype` it is stored as, and (`round_trip`, another adapter follows)
/// quantized and dequantized again, in that dtype ([`Weight4::round_trip`]).
pub(crate) struct Requantize4 {
    pub weight: Weight4,
    pub dtype: Dtype,
    pub round_trip: bool,
    pub threads: usize,
    pub avx512: bool,
}

impl Requantizer for Requantize4 {
    fn round_trip(
        &self,
        values: &[f32],
    ) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        let mut values = values.to_vec();
        round_slice_to(self.dtype, &mut values)?;
        if self.round_trip {
            values = self.weight.round_trip(&values, self.threads, self.avx512)?;
            round_slice_to(self.dtype, &mut values)?;
        }
        Ok(values)
    }
}

/// The tensors stored beside a re-quantized weight's packed bytes, as bytes.
pub(crate) struct Scales4 {
    pub absmax: Vec<u8>,
    pub nested_absmax: Option<Vec<u8>>,
    pub state: Vec<u8>,
}

/// A 4-bit weight's stored codes and block scales (double quantization undone), dequantized a
/// band of rows at a time (see [`Weight4::band_rows`]).
pub(crate) struct Stored4<'a> {
    name: &'a str,
    packed: StoredBytes<'a>,
    absmax: Vec<f32>,
    pub code: Code4,
    pub blocksize: usize,
    cols: usize,
    avx512: bool,
}

impl Stored4<'_> {
    /// `dequantize_4bit` of rows `rows` into `out` (their values, before the rounding to the
    /// weight's dtype): for a weight of [`Weight4::band_rows`], the values the whole weight's
    /// dequantization gives there.
    pub fn dequantize_rows(
        &self,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CheckpointError> {
        let err = |e| compute_error(self.name, "dequantizing a bitsandbytes 4-bit weight", e);
        let (start, end) = (rows.start * self.cols, rows.end * self.cols);
        let bs = self.blocksize.max(1);
        let Some(absmax) = self.absmax.get(start / bs..end.div_ceil(bs)) else {
            return Err(err(
                format!("rows {rows:?} lie past the stored weight").into()
            ));
        };
        let geometry = (self.blocksize, &[rows.len(), self.cols][..], self.avx512);
        self.packed.with(start / 2..end.div_ceil(2), |packed| {
            bnb_dequantize_4bit_into(packed, absmax, &self.code, geometry, out)
                .map_err(|e| err(e.into()))
        })
    }
}

/// Bands of rows as the dequantized view holds them: dequantized, rounded to its dtype.
impl BandSource for Weight4 {
    fn rows_in(&self, dtype: Dtype) -> Result<Box<Dequantize<'_>>, CheckpointError> {
        let err = |e| compute_error(&self.name, "dequantizing a bitsandbytes 4-bit weight", e);
        let stored = self.stored(host_avx512()).map_err(err)?;
        Ok(Box::new(move |rows, values: &mut [f32]| {
            stored.dequantize_rows(rows, values)?;
            round_slice_to(dtype, values).map_err(|e| err(e.into()))
        }))
    }
}

/// One tensor of a re-quantized weight.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Part {
    Packed,
    Absmax,
    NestedAbsmax,
    State,
}

/// A float tensor's values as `f32`.
fn f32s(t: &Tensor) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(decode_f32("bitsandbytes state", t.dtype(), &t.bytes()?)?)
}

impl From<PartError> for CheckpointError {
    fn from(e: PartError) -> Self {
        CheckpointError::TensorCompute {
            tensor: e.tensor,
            context: "reading a bitsandbytes 4-bit weight".into(),
            source: e.reason.into(),
        }
    }
}
