//! `quant_state.bitsandbytes__<type>`: the JSON bitsandbytes packs into a U8 tensor beside each
//! 4-bit weight (`QuantState.as_dict(packed=True)`), read and written byte for byte.

use peftkit_checkpoint::{float_repr, Dtype};
use serde::Deserialize;

use crate::kernels::Bnb4Type;

/// The non-tensor part of a 4-bit weight's quantization state.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct QuantState {
    pub quant_type: String,
    pub blocksize: usize,
    /// The weight's dtype before quantization (`"bfloat16"`, ...): what dequantization returns.
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Double quantization: the absmax values are 8-bit codes, in blocks of this size.
    pub nested_blocksize: Option<usize>,
    pub nested_dtype: Option<String>,
    /// The mean subtracted from the absmax values before they were quantized.
    pub nested_offset: Option<f64>,
}

impl QuantState {
    /// Parses the packed JSON bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let state: QuantState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        state.kind()?;
        state.weight_dtype()?;
        if state.blocksize == 0 || state.nested_blocksize == Some(0) {
            return Err("a blocksize of 0".into());
        }
        if state.nested_blocksize.is_some() != state.nested_offset.is_some() {
            return Err("nested_blocksize and nested_offset must come together".into());
        }
        Ok(state)
    }

    pub fn kind(&self) -> Result<Bnb4Type, String> {
        match self.quant_type.as_str() {
            "nf4" => Ok(Bnb4Type::Nf4),
            "fp4" => Ok(Bnb4Type::Fp4),
            other => Err(format!("quant_type {other:?} is neither nf4 nor fp4")),
        }
    }

    /// The dtype dequantization returns.
    pub fn weight_dtype(&self) -> Result<Dtype, String> {
        torch_dtype(&self.dtype).ok_or_else(|| {
            format!(
                "dtype {:?} is not a float dtype bitsandbytes quantizes",
                self.dtype
            )
        })
    }

    pub fn nested(&self) -> bool {
        self.nested_offset.is_some()
    }

    /// The packed bytes, as `json.dumps` writes the dict (insertion order, `", "` and `": "`).
    pub fn to_json(&self) -> Vec<u8> {
        let shape: Vec<String> = self.shape.iter().map(usize::to_string).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type,
            self.blocksize,
            self.dtype,
            shape.join(", ")
        );
        if let (Some(bs), Some(offset)) = (self.nested_blocksize, self.nested_offset) {
            let dtype = self.nested_dtype.as_deref().unwrap_or("float32");
            s += &format!(
                ", \"nested_blocksize\": {bs}, \"nested_dtype\": \"{dtype}\", \"nested_offset\": {}",
                float_repr(offset)
            );
        }
        s.push('}');
        s.into_bytes()
    }
}

/// The torch name (`str(dtype).strip("torch.")`) of a float dtype bitsandbytes quantizes.
pub(crate) fn torch_dtype(name: &str) -> Option<Dtype> {
    match name {
        "float32" => Some(Dtype::F32),
        "bfloat16" => Some(Dtype::BF16),
        "float16" => Some(Dtype::F16),
        _ => None,
    }
}

/// The inverse of [`torch_dtype`].
pub(crate) fn torch_name(dtype: Dtype) -> Option<&'static str> {
    match dtype {
        Dtype::F32 => Some("float32"),
        Dtype::BF16 => Some("bfloat16"),
        Dtype::F16 => Some("float16"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_byte_for_byte() {
        let text = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [32, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.052215576171875}"#;
        let state = QuantState::parse(text).unwrap();
        assert_eq!(state.to_json(), text.to_vec());
        let plain =
            br#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float16", "shape": [64, 64]}"#;
        assert_eq!(QuantState::parse(plain).unwrap().to_json(), plain.to_vec());
        assert!(QuantState::parse(
            br#"{"quant_type": "int4", "blocksize": 64, "dtype": "float16", "shape": [4]}"#
        )
        .is_err());
    }
}
