//! The data peftkit follows, as text compiled into the crates that parse it: peft 0.21.2's
//! adapter key rules and default targets, transformers 5.24's Conv1D modules and conversion
//! tables, and peft's model card template. Each file is documented in this crate's
//! `README.md` (and `conversions/README.md` for the tables).
//!
//! This crate only holds the text; the crates that read it own its schema and checks
//! (`peftkit_peft::spec`, `peftkit_remap::Registry`, …). It is a crate of its own so that the
//! folder stays at the top of the repository, readable as data, and every crate that embeds it
//! can still be packaged (an `include_str!` may not reach outside its package).
//!
//! # Overriding the built-in data
//!
//! There is one mechanism: a user JSON file is **layered over** the built-in text when the data
//! is loaded, and never replaces this crate. The loader reading each file takes the user file:
//!
//! | built-in | layered with | CLI |
//! |---|---|---|
//! | [`METHODS_JSON`], [`DEFAULT_TARGETS_JSON`] | `peftkit_peft::spec::Spec::load(Some(path))`, or `$PEFTKIT_ADAPTERS_SPEC` (`Spec::from_env`) | `PEFTKIT_ADAPTERS_SPEC=file.json` |
//! | [`conversions::TABLES`], [`conversions::ALIASES_JSON`] | `peftkit_remap::Registry::add_table_file`, `RemapOptions::tables`, `ReshardOptions::tables` | `--table file.json` |
//!
//! A user entry with the name of a built-in one replaces it; new names are added (see the
//! READMEs for how entries merge).
//!
//! ```
//! let methods: serde_json::Value = serde_json::from_str(peftkit_adapters_spec::METHODS_JSON).unwrap();
//! assert_eq!(methods["peft_version"], "0.21.2");
//! assert!(peftkit_adapters_spec::file("conversions/mixtral.json").is_some());
//! ```

#![deny(missing_docs)]

/// `methods.json`: one entry per `peft_type`, how its tensor keys look on disk and in memory.
pub const METHODS_JSON: &str = include_str!("../methods.json");

/// `default_targets.json`: peft's default `target_modules` (and IA3 `feedforward_modules`) per
/// `model_type`.
pub const DEFAULT_TARGETS_JSON: &str = include_str!("../default_targets.json");

/// `conv1d_modules.json`: per `model_type`, the modules transformers builds as GPT-2 style
/// `Conv1D` (weight stored `(in, out)`).
pub const CONV1D_MODULES_JSON: &str = include_str!("../conv1d_modules.json");

/// `legacy_moe_adapters.json`: model types whose legacy per-expert LoRA adapters peft fuses on
/// load, and the router rename.
pub const LEGACY_MOE_ADAPTERS_JSON: &str = include_str!("../legacy_moe_adapters.json");

/// `model_card_template.md`: the body of the `README.md` peft writes for a new adapter.
pub const MODEL_CARD_TEMPLATE: &str = include_str!("../model_card_template.md");

/// The conversion tables of `conversions/`: transformers' `conversion_mapping.py` as data.
pub mod conversions {
    /// Every embedded table, `(file name, text)`, in the order the registry loads them.
    pub const TABLES: &[(&str, &str)] = &[
        ("mixtral.json", include_str!("../conversions/mixtral.json")),
        ("phimoe.json", include_str!("../conversions/phimoe.json")),
        (
            "minimax_m2.json",
            include_str!("../conversions/minimax_m2.json"),
        ),
        (
            "qwen2_moe.json",
            include_str!("../conversions/qwen2_moe.json"),
        ),
        ("llava.json", include_str!("../conversions/llava.json")),
        (
            "gpt_neox.json",
            include_str!("../conversions/gpt_neox.json"),
        ),
        ("vit.json", include_str!("../conversions/vit.json")),
        ("legacy.json", include_str!("../conversions/legacy.json")),
    ];

    /// `aliases.json`: which table serves which `model_type`, and the tables every model gets.
    pub const ALIASES_JSON: &str = include_str!("../conversions/aliases.json");
}

/// Any embedded file by its path in this folder (`"methods.json"`,
/// `"conversions/mixtral.json"`), for tools that list or dump the built-in data.
pub fn file(path: &str) -> Option<&'static str> {
    let top = [
        ("methods.json", METHODS_JSON),
        ("default_targets.json", DEFAULT_TARGETS_JSON),
        ("conv1d_modules.json", CONV1D_MODULES_JSON),
        ("legacy_moe_adapters.json", LEGACY_MOE_ADAPTERS_JSON),
        ("model_card_template.md", MODEL_CARD_TEMPLATE),
        ("conversions/aliases.json", conversions::ALIASES_JSON),
    ];
    if let Some((_, text)) = top.iter().find(|(name, _)| *name == path) {
        return Some(text);
    }
    let table = path.strip_prefix("conversions/")?;
    conversions::TABLES
        .iter()
        .find(|(name, _)| *name == table)
        .map(|(_, text)| *text)
}
