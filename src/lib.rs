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
//!
//! The types most programs start from are also re-exported here, flat
//! ([`Checkpoint`], [`StateDict`], [`Registry`], ...).
//!
//! The `peftkit` binary is a thin command-line layer over these, built with the default `cli`
//! feature. A library user can turn it off (`default-features = false`) to leave out clap,
//! indicatif and anyhow.

#![deny(missing_docs)]

pub use peftkit_checkpoint as checkpoint;
pub use peftkit_merge as merge;
pub use peftkit_peft as peft;
pub use peftkit_remap as remap;

pub use peftkit_checkpoint::{
    resolve_model_path, Checkpoint, CheckpointError, Dtype, HubCache, ModelConfig, RepoSpec,
    SaveOptions, StateDict, Tensor, WeightsKind,
};
pub use peftkit_remap::{
    convert, Mapping, Registry, RemapError, RemapOptions, ReshardOptions, Revert,
};

/// The examples of docs/library.md, compiled and run as doc tests so the guide cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../docs/library.md")]
pub struct LibraryGuide;
