//! Merging PEFT adapters into Hugging Face checkpoints, bit for bit as peft 0.21.2's
//! `merge_and_unload()` does on CPU.
//!
//! Two layers, both re-exported flat at this root:
//!
//! * the numeric kernels: pure functions over byte and `f32` slices, no file IO, reproducing
//!   peft's CPU arithmetic (torch, MKL's reduction order from [`ReductionOrder`]) or one
//!   correct rounding with [`Numerics::Exact`]: LoRA ([`merge_linear`], [`merge_embedding`],
//!   [`merge_conv`], [`merge_experts`], [`merge_lora_bias`]), DoRA ([`merge_dora_linear`]
//!   and friends), IA³, LoHa, LoKr and trainable tokens ([`merge_ia3_weight`],
//!   [`merge_loha`], [`merge_lokr`], [`replace_rows`]), the scale ([`lora_scaling`]) and
//!   dtype conversion with torch's rounding ([`encode_f32`], [`decode_f32`]). Base tensors are
//!   raw bytes updated in place ([`BaseTensorMut`]), adapter factors `f32` slices
//!   ([`F32Tensor`]); every kernel validates shapes and returns [`MergeMathError`] instead of
//!   panicking;
//! * the streaming merge: [`merge`] of a [`MergeJob`] plans every adapter against the base's
//!   headers, refuses what it cannot merge ([`MergeError`], [`UnsupportedMerge`]) before
//!   writing anything, then merges each touched tensor lazily as the output is written.
//!   FP8 block-scaled bases (transformers' fine-grained FP8) and bitsandbytes 4-bit and 8-bit
//!   bases are merged through their dequantized weights and re-quantized, or written dequantized
//!   ([`MergeJob::dequantize`]), and reported in [`QuantizationReport`]; a 16-bit base can be
//!   merged into its 4-bit round trip ([`MergeJob::qlora_base`]); bases in any other
//!   quantization are refused ([`MergeError::QuantizedBase`]).
//!
//! ```no_run
//! use peftkit_merge::{merge, AdapterInput, MergeJob, Numerics};
//!
//! let job = MergeJob::new("base", vec![AdapterInput::parse("adapter:0.5")], "merged")
//!     .numerics(Numerics::Exact)
//!     .progress(|bytes| eprint!("."));
//! let summary = merge(&job)?;
//! assert_eq!(summary.numerics.mode, Numerics::Exact);
//! # Ok::<(), peftkit_merge::MergeError>(())
//! ```
//!
//! This is the only crate of the workspace with `unsafe` code: the AVX-512 and AVX2 kernels, the
//! disjoint row writes of the parallel kernels, and the shared mapping through which an unsynced
//! merge changes its output file in place. It is built on `peftkit-peft` (adapters and
//! their configs), `peftkit-remap` (on-disk layouts) and `peftkit-checkpoint` (tensors,
//! safetensors IO, atomic saves).
#![deny(missing_docs)]

mod edit;
mod error;
mod file_io;
mod job;
mod kernels;
mod mapped;
mod plan;
mod quant;
mod report;
mod stream;

pub use error::{MergeError, NonFiniteResult, UnsupportedMerge};
pub use job::{AdapterInput, MergeJob};
pub use kernels::*;
pub use peftkit_checkpoint::Progress;
pub use quant::bnb::{set_bnb_avx512, BnbError, Int8RangeError, ParseBnb4TypeError, QloraBase};
pub use report::{MergeSummary, NumericsReport, QuantizationReport, RequantizedTensor};
pub use stream::merge;
