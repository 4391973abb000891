//! PEFT adapters as peft 0.21.2 reads and writes them, and their merge into base checkpoints.
//!
//! * [`spec`]: the data-driven name rules of every PEFT method (adapters-spec/).
//! * [`config`]: `adapter_config.json`, read leniently, validated strictly, written byte for
//!   byte as peft writes it.
//! * [`targeting`]: peft's target-module, layer and rank/alpha pattern rules.
//! * [`adapter`]: loading adapter folders, every tensor sorted by role.
//! * [`merge`]: the numeric kernels, bit-identical to peft's CPU merge.
//! * [`pipeline`]: the streaming merge of adapters into a checkpoint.
//!
//! Built on `peftkit-checkpoint`, which knows nothing of PEFT.

pub mod adapter;
pub mod config;
pub mod merge;
pub mod pipeline;
pub mod spec;
pub mod targeting;
