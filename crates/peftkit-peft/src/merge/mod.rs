//! Numeric kernels of the merge: pure functions over slices, no file IO.
//!
//! They reproduce peft 0.21.2's `merge_and_unload()` on CPU (torch 2.15, MKL, AVX512) bit for
//! bit, following reference §5–§6 and the measurements recorded in each module:
//!
//! * [`dtype`]: little-endian F32/BF16/F16/F64 bytes ⇄ `f32`/`f64`, with torch's rounding and
//!   NaN bit patterns.
//! * [`gemm`]: `B @ A` in MKL's reduction order (sequential FMA over the rank, K-blocking),
//!   with the host's blocking from [`ReductionOrder`].
//! * [`lora`]: LoRA for Linear / `Conv1D`, Embedding, Conv, MoE experts, `lora_bias`, unmerge,
//!   `safe_merge`.
//! * [`dora`]: DoRA for Linear / `Conv1D`, Embedding, Conv, with torch's norm reduction order.
//! * [`methods`]: IA³, LoHa, LoKr, trainable-token rows, and a generic delta add.
//! * [`exact`]: the other [`Numerics`] mode, correctly rounded and identical on every machine
//!   (selected with [`MergeOptions::numerics`]).
//!
//! Base tensors are passed as raw bytes ([`BaseTensorMut`]) and updated in place; adapter
//! factors are `f32` slices ([`F32Tensor`]), i.e. already widened the way peft's default
//! `autocast_adapter_dtype=True` widens BF16/F16 adapters. Every kernel validates shapes and
//! returns [`MergeMathError`] instead of panicking.

mod apply;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod dora;
pub mod dtype;
mod error;
pub mod exact;
mod fused;
pub mod gemm;
pub mod lora;
pub mod methods;
mod order;

pub use apply::{BaseTensorMut, F32Tensor};
pub use error::{MergeMathError, Result};
pub use exact::{Numerics, ParseNumericsError};
pub use lora::{lora_scaling, ExpertLayout, MergeOptions};
pub use order::{
    host_order, reduction_order, set_reduction_order, Blocking, Halves, HostOrder, ReductionOrder,
    UnknownOrder, UNVERIFIED_BOUND_ULP,
};
