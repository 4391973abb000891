//! A 16-bit weight through the QLoRA round trip (`--qlora-base`), a band of rows at a time:
//! the rows read from the base file, quantized to 4 bits as transformers quantizes them for
//! QLoRA and dequantized again, for the merge to stream (`streamed`).
//!
//! Blocks are 64 values and a weight's rows whole blocks, so a band quantizes to the codes
//! and block maxima the whole weight has there. With double quantization the block maxima go
//! through the 8-bit code less their mean over the whole weight, so they are all taken first,
//! in a pass over the weight that quantizes nothing.

use std::ops::Range;

use peftkit_checkpoint::{CheckpointError, Dtype, Tensor};

use super::banded::{rows_per_band, BandRows, BandSource, Dequantize, StoredBytes};
use super::codes;
use super::view::{compute_error, qlora_settings, with_values, QLORA_BLOCKSIZE};
use super::{host_avx512, torch_threads, QloraBase};
use crate::kernels::{
    bnb_block_absmax, bnb_dequantize_4bit_into, decode_f32_into, element_size, quantize_4bit_chunk,
    round_slice_to,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One 16-bit weight of a QLoRA base, to be round-tripped band by band.
#[derive(Clone)]
pub(super) struct QloraRows {
    name: String,
    /// The base's weight.
    base: Tensor,
    cols: usize,
    q: QloraBase,
    /// bitsandbytes' 8-bit dynamic code, for double quantization.
    dynamic: [f32; 256],
}

impl QloraRows {
    /// The weight `name` of the base, if it can be round-tripped band by band: 2-D, of a float
    /// dtype, its rows whole blocks; and the rows of its bands.
    pub fn new(name: &str, base: &Tensor, q: QloraBase) -> Option<(Self, usize)> {
        let &[_, cols] = base.shape() else {
            return None;
        };
        let float = matches!(base.dtype(), Dtype::BF16 | Dtype::F16 | Dtype::F32);
        if !float || cols == 0 || cols % QLORA_BLOCKSIZE != 0 {
            return None;
        }
        let rows = QloraRows {
            name: name.to_owned(),
            base: base.clone(),
            cols,
            q,
            dynamic: codes::values(&codes::DYNAMIC),
        };
        Some((rows, rows_per_band(cols)))
    }

    fn error(&self, e: BoxError) -> CheckpointError {
        compute_error(
            &self.name,
            "the bitsandbytes 4-bit round trip (--qlora-base)",
            e,
        )
    }

    /// The block maxima of the whole weight, as the quantizer stores them, band by band.
    fn block_absmax(&self, stored: &Rows<'_>) -> Result<Vec<f32>, CheckpointError> {
        let (total, bs) = (self.base.shape()[0], QLORA_BLOCKSIZE);
        let mut absmax = vec![0f32; total * self.cols / bs];
        let per = rows_per_band(self.cols);
        for (i, out) in absmax.chunks_mut(per * self.cols / bs).enumerate() {
            let rows = i * per..((i + 1) * per).min(total);
            with_values(|buf| {
                buf.resize(buf.len().max(rows.len() * self.cols), 0.0);
                let values = &mut buf[..rows.len() * self.cols];
                stored.read_f32(rows, values)?;
                bnb_block_absmax(values, bs, out).map_err(|e| self.error(e.into()))
            })?;
        }
        Ok(absmax)
    }
}

impl BandSource for QloraRows {
    fn rows_in(&self, dtype: Dtype) -> Result<Box<Dequantize<'_>>, CheckpointError> {
        let stored = Rows::of(&self.name, &self.base)?;
        let settings = qlora_settings(self.q, &self.dynamic);
        let (avx512, cols, bs) = (host_avx512(), self.cols, settings.blocksize);
        // Every block maximum first, when double quantization needs their mean.
        let nested = match self.q.double_quant {
            true => {
                let absmax = self.block_absmax(&stored)?;
                let stored = settings.stored_absmax(absmax, torch_threads());
                Some(stored.map_err(|e| self.error(e))?)
            }
            false => None,
        };
        Ok(Box::new(move |rows: BandRows, values: &mut [f32]| {
            stored.read_f32(rows.clone(), values)?;
            let mut packed = vec![0u8; values.len() / 2];
            let mut absmax = vec![0f32; values.len() / bs];
            quantize_4bit_chunk(values, bs, &settings.code, &mut packed, &mut absmax);
            let scales = match &nested {
                Some(all) => &all[rows.start * cols / bs..rows.end * cols / bs],
                None => &absmax[..],
            };
            let geometry = (bs, &[rows.len(), cols][..], avx512);
            bnb_dequantize_4bit_into(&packed, scales, &settings.code, geometry, values)
                .map_err(|e| self.error(e.into()))?;
            round_slice_to(dtype, values).map_err(|e| self.error(e.into()))
        }))
    }
}

/// A 16-bit weight's rows read as `f32`, a band at a time ([`StoredBytes`]).
struct Rows<'a> {
    name: &'a str,
    dtype: Dtype,
    bytes: StoredBytes<'a>,
    row_bytes: usize,
}

impl<'a> Rows<'a> {
    fn of(name: &'a str, tensor: &'a Tensor) -> Result<Self, CheckpointError> {
        let size = element_size(tensor.dtype()).unwrap_or(1);
        Ok(Rows {
            name,
            dtype: tensor.dtype(),
            bytes: StoredBytes::of(name, tensor)?,
            row_bytes: tensor.shape().last().copied().unwrap_or(1) * size,
        })
    }

    /// Rows `rows` decoded into `values`.
    fn read_f32(&self, rows: Range<usize>, values: &mut [f32]) -> Result<(), CheckpointError> {
        let range = rows.start * self.row_bytes..rows.end * self.row_bytes;
        self.bytes.with(range, |bytes| {
            decode_f32_into("QLoRA base weight", self.dtype, bytes, values)
                .map_err(|e| compute_error(self.name, "reading the QLoRA base's rows", e.into()))
        })
    }
}
