//! The adapters-spec files this crate reads (from the `peftkit-adapters-spec` data crate), in
//! one place, re-exported at the crate root.

/// `adapters-spec/methods.json` as embedded at build time.
pub const EMBEDDED_METHODS_JSON: &str = peftkit_adapters_spec::METHODS_JSON;

/// `adapters-spec/default_targets.json` as embedded at build time.
pub const EMBEDDED_DEFAULT_TARGETS_JSON: &str = peftkit_adapters_spec::DEFAULT_TARGETS_JSON;

/// `adapters-spec/conv1d_modules.json` as embedded at build time: per `model_type`, the module
/// names (dotted suffixes) that transformers builds as GPT-2 style `Conv1D`.
pub const EMBEDDED_CONV1D_MODULES_JSON: &str = peftkit_adapters_spec::CONV1D_MODULES_JSON;

/// The body of the model card peft writes for a new adapter: huggingface_hub's default model
/// card template rendered with empty data (adapters-spec/model_card_template.md).
pub const MODEL_CARD_TEMPLATE: &str = peftkit_adapters_spec::MODEL_CARD_TEMPLATE;

/// `adapters-spec/legacy_moe_adapters.json`, embedded at build time.
pub const LEGACY_MOE_ADAPTERS_JSON: &str = peftkit_adapters_spec::LEGACY_MOE_ADAPTERS_JSON;
