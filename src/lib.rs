//! peftkit: save Hugging Face checkpoints and PEFT adapters exactly as transformers and peft
//! do, and merge, extract, reshard and verify them in bounded memory.
//!
//! This facade re-exports the workspace's library crates:
//!
//! * [`checkpoint`] (`peftkit-checkpoint`): tensors, safetensors IO, shard planning, index,
//!   configs, atomic saves. Knows nothing of PEFT.
//! * [`remap`] (`peftkit-remap`): declarative conversion between the original on-disk layout
//!   and the transformers-v5 layout (`save_original_format`).
//! * [`peft`] (`peftkit-peft`): adapter name rules, adapter configs, adapter save, load and
//!   extract.
//! * [`merge`] (`peftkit-merge`): the merge kernels, bit-identical to peft, and the streaming
//!   merge of adapters into a checkpoint.
//! * `burn` (`peftkit-burn`, behind the `burn` feature): Hugging Face checkpoints and peft
//!   adapters in and out of burn 0.22, with a Llama-family model that trains LoRA.
//!
//! The types most programs start from are also re-exported here, flat
//! ([`Checkpoint`], [`StateDict`], [`Registry`], [`MergeJob`], [`diff_checkpoints`], ...).
//! Options structs are built from `Default` (or a constructor) with one chained setter per
//! field, so a field added later breaks no caller:
//!
//! ```
//! let options = peftkit::SaveOptions::default().variant("fp16").durable(false);
//! assert_eq!(options.variant.as_deref(), Some("fp16"));
//! ```
//!
//! The `peftkit` binary is a thin command-line layer over these, built with the default `cli`
//! feature. A library user can turn it off (`default-features = false`) to leave out clap,
//! indicatif and anyhow.

#![deny(missing_docs)]

pub use peftkit_checkpoint as checkpoint;
pub use peftkit_merge as merge;
pub use peftkit_peft as peft;
pub use peftkit_remap as remap;

/// Hugging Face checkpoints and peft adapters in and out of burn (the `burn` feature).
#[cfg(feature = "burn")]
pub use peftkit_burn as burn;

pub use peftkit_checkpoint::{
    resolve_model_path, save_pretrained_distributed, Barrier, Checkpoint, CheckpointError, Dtype,
    HubCache, ModelConfig, Rank, RepoSpec, SaveOptions, StateDict, Tensor, WeightsKind,
};
pub use peftkit_merge::{AdapterInput, MergeJob};
pub use peftkit_remap::{
    convert, diff_checkpoints, gather, split, DiffOptions, GatherOptions, Mapping, Registry,
    RemapError, RemapOptions, ReshardOptions, Revert, SplitOptions, TpPlans,
};

/// The examples of docs/library.md, compiled and run as doc tests so the guide cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../docs/library.md")]
pub struct LibraryGuide;
