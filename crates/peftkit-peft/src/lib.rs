//! PEFT adapters as peft 0.21.2 reads and writes them. Merging them into base checkpoints
//! is `peftkit-merge`'s job, which builds on this crate.
//!
//! Every public item is re-exported flat at this root. The private modules behind them each
//! depend only on those listed above them:
//!
//! * `py`: Python semantics peft relies on: `re` patterns ([`PyRegex`]), [`re_escape`], the
//!   suffix rule ([`name_matches_suffix`]).
//! * `scaling`: the LoRA scale ([`lora_scaling`]) every kernel, planner and summary uses.
//! * `targeting`: peft's target-module, layer and rank/alpha pattern rules
//!   ([`TargetMatcher`], [`PatternResolver`]) and the config values they read.
//! * `spec`: the data-driven name rules of every PEFT method ([`Spec`], adapters-spec/).
//! * `config`: `adapter_config.json` ([`AdapterConfig`], [`LoraConfig`]), read leniently,
//!   validated strictly, written byte for byte as peft writes it.
//! * `adapter`: loading adapter folders, every tensor sorted by role ([`Adapter`]).
//! * `classify`: sorting any state dict (full PEFT model, adapter file, burn export) into base
//!   and adapter parameters ([`classify_state_dict`]), and inferring the adapter config peft
//!   would write ([`infer_config`]).
//! * `save`: writing adapter folders exactly as peft's `save_pretrained` does
//!   ([`save_adapter`]).
//! * `extract`: the adapter (and optionally the clean base) out of a full state dict
//!   ([`extract()`]).
//! * `legacy_moe`: legacy per-expert MoE adapters fused into the transformers-v5 layout, as
//!   peft converts them on load ([`convert_legacy_adapter_dir`]).
//!
//! Built on `peftkit-checkpoint`, which knows nothing of PEFT.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod adapter;
mod classify;
mod config;
mod embedded;
mod extract;
mod legacy_moe;
mod py;
mod save;
mod scaling;
mod spec;
mod targeting;

pub use adapter::{Adapter, AdapterEntry, AdapterError, AdapterModule, AdapterTensors, EntryKind};
pub use classify::{
    check_config, classify_state_dict, clean_base_key, conv1d_table, describe_tensor, infer_config,
    infer_lora_structure, origin_of, summarize_adapters, summarize_classified, summarize_path,
    summarize_path_variant, AdapterSummary, BaseModelInfo, ClassifiedStateDict, ClassifyError,
    ClassifyOptions, InferOptions, Inferred, LoraStructure, ScalingSummary, StateDictLayout,
    TaskTypeChoice, DEFAULT_ADAPTER_NAME, EMBEDDING_LAYER_NAMES, MODEL_PREFIX, PROMPT_BASE_PREFIX,
};
pub use config::{
    AdapterConfig, ConfigError, ConfigWarning, GenericConfig, InitLoraWeights, LoraConfig,
    SetOrder, TrainableTokenIndices, WriteOptions, ADAPTER_CONFIG_NAME, LORA, LORA_BIAS_VALUES,
    LORA_FIELDS, PEFT_VERSION, TASK_TYPES,
};
pub use embedded::{
    EMBEDDED_CONV1D_MODULES_JSON, EMBEDDED_DEFAULT_TARGETS_JSON, EMBEDDED_METHODS_JSON,
    LEGACY_MOE_ADAPTERS_JSON, MODEL_CARD_TEMPLATE,
};
pub use extract::{
    extract, extract_from, open_source, parse_lora_alpha, ExtractError, ExtractOptions,
    ExtractReport, Source,
};
pub use legacy_moe::{
    convert_legacy_adapter_dir, convert_legacy_adapter_dir_with, convert_legacy_experts,
    convert_legacy_experts_with, convert_with_rules, model_type_from_base, supported_model_types,
    ConvertError, ConvertOptions, ConvertReport, Converted, FusedParam, LegacyMoeRules, Untargeted,
};
pub use py::{name_matches_suffix, re_escape, PyMatchMode, PyRegex, RegexError};
pub use save::{
    adapter_folder, model_card, save_adapter, save_classified, save_pretrained, AdapterSaveOptions,
    AdapterSaveReport, PeftSaveOptions, PeftSaveReport, SaveError, MODEL_CARD_NAME,
};
pub use scaling::{lora_scaling, ZeroRank};
pub use spec::{
    classify_key, remove_adapter_name, AdapterNamePlacement, KeyClass, KeyRule, MethodSpec,
    RuleScope, Spec, SpecError, USER_SPEC_ENV,
};
pub use targeting::{
    compress_target_modules, minimal_target_suffixes, LayersToTransform, PatternResolver,
    StringOrList, TargetMatch, TargetMatcher, TargetModules, TargetRules, TargetingError,
    ALL_LINEAR, MIN_TARGET_MODULES_FOR_OPTIMIZATION,
};
