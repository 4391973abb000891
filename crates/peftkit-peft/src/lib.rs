//! PEFT adapters as peft 0.21.2 reads and writes them. Merging them into base checkpoints
//! is `peftkit-merge`'s job, which builds on this crate.
//!
//! Modules, each depending only on those above it:
//!
//! * [`py`]: Python semantics peft relies on: `re` patterns, `re.escape`, the suffix rule.
//! * [`targeting`]: peft's target-module, layer and rank/alpha pattern rules, and the config
//!   values they read.
//! * [`spec`]: the data-driven name rules of every PEFT method (adapters-spec/).
//! * [`config`]: `adapter_config.json`, read leniently, validated strictly, written byte for
//!   byte as peft writes it.
//! * [`adapter`]: loading adapter folders, every tensor sorted by role.
//! * [`classify`]: sorting any state dict (full PEFT model, adapter file, burn export) into
//!   base and adapter parameters, and inferring the adapter config peft would write.
//! * [`save`]: writing adapter folders exactly as peft's `save_pretrained` does.
//! * [`extract`]: the adapter (and optionally the clean base) out of a full state dict.
//! * [`legacy_moe`]: legacy per-expert MoE adapters fused into the transformers-v5 layout, as
//!   peft converts them on load (formerly `convert`, still reachable under that name).
//!
//! Built on `peftkit-checkpoint`, which knows nothing of PEFT.
#![forbid(unsafe_code)]

pub mod adapter;
pub mod classify;
pub mod config;
mod embedded;
pub mod extract;
pub mod legacy_moe;
pub mod py;
pub mod save;
mod scaling;
pub mod spec;
pub mod targeting;

pub use scaling::{lora_scaling, ZeroRank};

/// The old name of [`legacy_moe`], kept so that `peftkit_peft::convert::…` paths still compile.
pub mod convert {
    pub use crate::legacy_moe::*;
}
