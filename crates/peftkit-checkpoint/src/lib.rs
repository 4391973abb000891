//! Hugging Face base checkpoints, written the way transformers 5.x writes them.
//!
//! This crate knows safetensors files, shard planning, the sharded index, `config.json` and
//! `generation_config.json`, and atomic folder saves. It knows nothing of PEFT.
//!
//! * [`Tensor`] and [`StateDict`]: handles on tensors whose bytes are read or computed only
//!   when written, so no operation holds a model in memory.
//! * [`save_pretrained`]: the files of transformers' `save_pretrained`, byte for byte.
//! * [`Checkpoint`]: a single-file or sharded checkpoint opened by its headers, validated.
//! * [`checkpoint::verify`]: every inconsistency of a checkpoint on disk.

pub mod atomic;
pub mod checkpoint;
pub mod companion;
pub mod config;
pub mod error;
pub mod index;
pub mod inspect;
pub mod names;
pub mod natural;
pub mod progress;
pub mod pyjson;
pub mod safetensors_file;
pub mod save;
pub mod shard;
pub mod tensor;

pub use checkpoint::{Checkpoint, Layout};
pub use config::{GenerationConfig, ModelConfig};
pub use error::{CheckpointError, Result};
pub use index::WeightIndex;
pub use names::{WeightsKind, WeightsNames};
pub use progress::Progress;
pub use save::{
    plan_save, save_planned, save_pretrained, save_pretrained_with_progress, SaveOptions, SavePlan,
    SaveReport,
};
pub use shard::parse_size;
pub use tensor::{Dtype, StateDict, Tensor};
