//! Numeric kernels of the merge: pure functions over slices, no file IO.
//!
//! They reproduce peft 0.21.2's `merge_and_unload()` on CPU (torch 2.15, MKL, AVX512) bit for
//! bit, following docs/formats.md ("Merge numerics") and the measurements recorded in each module:
//!
//! * [`dtype`]: little-endian F32/BF16/F16/F64 bytes ⇄ `f32`/`f64`, with torch's rounding and
//!   NaN bit patterns.
//! * [`gemm`]: `B @ A` in MKL's reduction order (sequential FMA over the rank, K-blocking),
//!   with the host's blocking from [`ReductionOrder`].
//! * [`lora`]: LoRA for Linear / `Conv1D`, Embedding, Conv, MoE experts, `lora_bias`, unmerge,
//!   `safe_merge`.
//! * [`dora`]: DoRA for Linear / `Conv1D`, Embedding, Conv, with torch's norm reduction order.
//! * [`methods`]: IA³, LoHa, LoKr, trainable-token rows, and a generic delta add.
//! * [`bnb`]: bitsandbytes' 4-bit and 8-bit blockwise (de)quantization on the CPU,
//!   [`bnb_int8`]: its 8-bit (LLM.int8) row-wise quantization, and
//!   [`torch_sum`]: torch's `f32` sum order (the mean double quantization subtracts).
//! * [`fp8`]: FP8 block-scaled weights (e4m3 with `weight_scale_inv`) dequantized and
//!   re-quantized as transformers' finegrained_fp8 does on CPU.
//! * [`exact`]: the other [`Numerics`] mode, correctly rounded and identical on every machine
//!   (selected with [`MergeOptions::numerics`]).
//!
//! Base tensors are passed as raw bytes ([`BaseTensorMut`]) and updated in place; adapter
//! factors are `f32` slices ([`F32Tensor`]), i.e. already widened the way peft's default
//! `autocast_adapter_dtype=True` widens BF16/F16 adapters. Every kernel validates shapes and
//! returns [`MergeMathError`] instead of panicking.

mod apply;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod bnb;
pub(crate) mod bnb_int8;
pub(crate) mod dora;
pub(crate) mod dtype;
mod error;
pub(crate) mod exact;
pub(crate) mod fp8;
mod fp8_rows;
#[cfg(target_arch = "x86_64")]
mod fp8_x86;
mod fused;
pub(crate) mod gemm;
mod isa;
pub(crate) mod lora;
pub(crate) mod methods;
mod order;
mod torch_sum;

#[cfg(test)]
pub(crate) use apply::MemoryBlocks;
pub(crate) use apply::{
    stream_blocks, with_kept, BaseSource, BlockIo, FiniteProbe, STREAM_BLOCK_BYTES,
};
pub use apply::{BaseTensorMut, F32Tensor};
pub(crate) use bnb::{
    bnb_block_absmax, bnb_dequantize_4bit_into, bnb_quantize_4bit_into, quantize_4bit_chunk,
};
pub use bnb::{
    bnb_dequantize_4bit, bnb_dequantize_blockwise, bnb_quantize_4bit, bnb_quantize_blockwise,
    Bnb4Type, Code4,
};
pub use bnb_int8::{bnb_int8_dequantize, bnb_int8_quantize, Int8Quantized};
pub(crate) use bnb_int8::{bnb_int8_dequantize_bytes_into, bnb_int8_quantize_rows_into};
pub use dora::{
    merge_dora_conv, merge_dora_embedding, merge_dora_linear, torch_column_norms, torch_row_norm,
};
pub use dtype::{
    bf16_bits_to_f32, decode_f32, decode_f32_into, decode_f64, decode_f64_into, element_count,
    element_size, encode_f32, encode_f32_into, encode_f64_into, f16_bits_to_f32, f32_to_bf16_bits,
    f32_to_f16_bits, round_f32_to, round_slice_to,
};
pub use error::MergeMathError;
pub use exact::{refusal, refusal_reason, Numerics, ParseNumericsError};
pub use fp8::{
    dequantize_fp8, dequantize_fp8_into, e4m3_to_f32, e8m0_to_f32, f32_to_e4m3, quantize_fp8,
    quantize_fp8_into, requantize_fp8_bands, ue8m0_round_up, Fp8Grid, Fp8Quantized, ScaleKind,
    E4M3_MAX,
};
pub(crate) use fp8::{nan_max, requantize_fp8_chunk, Fp8Chunk};
pub use gemm::lowrank_product;
pub use lora::{
    conv_delta, embedding_delta, experts_delta, linear_delta, merge_conv, merge_embedding,
    merge_experts, merge_linear, merge_lora_bias, ExpertLayout, MergeOptions,
};
pub(crate) use lora::{LoraKind, StreamedBase};
// The scale lives with the adapter rules in peftkit-peft (one home for planners, kernels and
// summaries); it stays reachable here under the name merge users know.
pub use methods::{
    add_delta, loha_delta, lokr_delta, merge_ia3_bias, merge_ia3_weight, merge_loha, merge_lokr,
    replace_rows, LokrFactor,
};
pub use order::{
    host_order, reduction_order, reduction_order_is_chosen, set_reduction_order, Blocking, Halves,
    HostOrder, ReductionOrder, UnknownOrder, UNVERIFIED_BOUND_ULP,
};
pub use peftkit_peft::lora_scaling;
pub use torch_sum::{torch_mean_f32, torch_sum_f32};
