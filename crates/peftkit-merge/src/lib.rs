//! Merging PEFT adapters into Hugging Face checkpoints, bit for bit as peft 0.21.2's
//! `merge_and_unload()` does on CPU.
//!
//! Two layers, both re-exported flat at this root:
//!
//! * the numeric kernels: pure functions over byte and `f32` slices (LoRA, DoRA, IA³, LoHa,
//!   LoKr, trainable tokens, dtype conversion), reproducing MKL's reduction order, or one
//!   correct rounding with [`Numerics::Exact`];
//! * the streaming merge ([`merge`] of a [`MergeJob`]): adapters planned against the base's
//!   headers, then every touched tensor merged lazily as the output is written.
//!
//! This is the only crate of the workspace with `unsafe` code (the AVX-512 kernels and the
//! disjoint row writes of the parallel kernels); everything below it forbids it.
//!
//! Built on `peftkit-peft` (adapters and their configs), `peftkit-remap` (on-disk layouts)
//! and `peftkit-checkpoint` (tensors, safetensors IO, atomic saves).
#![deny(missing_docs)]

mod kernels;
mod pipeline;

pub use kernels::*;
pub use pipeline::*;
