//! File names of a checkpoint: weights, shards, index, and which old files a new save
//! replaces.

use crate::error::{CheckpointError, Result};

/// Which family of weight files is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsKind {
    /// `model.safetensors` (a base checkpoint).
    #[default]
    Model,
    /// `adapter_model.safetensors` (a PEFT adapter; its index keeps the model name, as peft
    /// and transformers write it).
    Adapter,
}

/// The names of the files of one save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsNames {
    kind: WeightsKind,
    variant: Option<String>,
}

impl WeightsNames {
    /// Names for `kind` with an optional variant (`model.fp16.safetensors`). transformers
    /// ignores the variant for adapter weights, but still applies it to their index name.
    pub fn new(kind: WeightsKind, variant: Option<&str>) -> Result<Self> {
        if let Some(v) = variant {
            if v.is_empty() || v.contains(['/', '\\']) || v == "." || v == ".." {
                return Err(CheckpointError::InvalidIndex {
                    path: v.into(),
                    reason: "a variant must be a non-empty name without path separators".into(),
                });
            }
        }
        Ok(WeightsNames {
            kind,
            variant: variant.map(str::to_owned),
        })
    }

    /// The single-file name: `model.safetensors`, `model.fp16.safetensors`,
    /// `adapter_model.safetensors`.
    pub fn single(&self) -> String {
        match self.kind {
            WeightsKind::Model => add_variant("model.safetensors", self.variant.as_deref()),
            WeightsKind::Adapter => "adapter_model.safetensors".to_owned(),
        }
    }

    /// The stem shards are named after: `model`, `model.fp16`, `adapter_model`.
    pub fn stem(&self) -> String {
        let single = self.single();
        single
            .strip_suffix(".safetensors")
            .unwrap_or(&single)
            .to_owned()
    }

    /// Shard `i` (1-based) of `n`: `model-00001-of-00003.safetensors`.
    pub fn shard(&self, i: usize, n: usize) -> String {
        format!("{}-{i:05}-of-{n:05}.safetensors", self.stem())
    }

    /// The index: `model.safetensors.index.json`, `model.safetensors.index.fp16.json`.
    pub fn index(&self) -> String {
        add_variant("model.safetensors.index.json", self.variant.as_deref())
    }

    /// The pickle (`torch.save`) single file transformers v4 wrote and still reads when no
    /// safetensors file is there: `pytorch_model.bin`, `pytorch_model.fp16.bin`,
    /// `adapter_model.bin`.
    pub fn pickle_single(&self) -> String {
        match self.kind {
            WeightsKind::Model => add_variant("pytorch_model.bin", self.variant.as_deref()),
            WeightsKind::Adapter => "adapter_model.bin".to_owned(),
        }
    }

    /// The index of sharded pickle weights: `pytorch_model.bin.index.json`,
    /// `pytorch_model.bin.index.fp16.json`.
    pub fn pickle_index(&self) -> String {
        add_variant("pytorch_model.bin.index.json", self.variant.as_deref())
    }

    /// Whether `file_name` is a shard of this stem (any count): `model-00002-of-00009.safetensors`.
    ///
    /// transformers deletes every file that merely *starts with* the stem and ends in a shard
    /// suffix, so a plain save also deletes `model.fp16-…` variant shards. Here the stem must
    /// match exactly, so other variants are never touched.
    pub fn is_shard_of_this_stem(&self, file_name: &str) -> bool {
        let Some(rest) = file_name.strip_prefix(&self.stem()) else {
            return false;
        };
        let Some(rest) = rest.strip_suffix(".safetensors") else {
            return false;
        };
        let b = rest.as_bytes();
        b.len() == 15
            && b[0] == b'-'
            && b[1..6].iter().all(u8::is_ascii_digit)
            && &b[6..10] == b"-of-"
            && b[10..15].iter().all(u8::is_ascii_digit)
    }
}

/// transformers' `_add_variant`: insert `.{variant}` before the last dot.
fn add_variant(name: &str, variant: Option<&str>) -> String {
    match (variant, name.rsplit_once('.')) {
        (Some(v), Some((head, ext))) => format!("{head}.{v}.{ext}"),
        _ => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_transformers() {
        let n = WeightsNames::new(WeightsKind::Model, Some("fp16")).unwrap();
        assert_eq!(n.single(), "model.fp16.safetensors");
        assert_eq!(n.shard(1, 4), "model.fp16-00001-of-00004.safetensors");
        assert_eq!(n.index(), "model.safetensors.index.fp16.json");
        let a = WeightsNames::new(WeightsKind::Adapter, Some("fp16")).unwrap();
        assert_eq!(a.single(), "adapter_model.safetensors");
        assert_eq!(a.shard(2, 3), "adapter_model-00002-of-00003.safetensors");
        assert_eq!(a.index(), "model.safetensors.index.fp16.json");
        assert_eq!(n.pickle_single(), "pytorch_model.fp16.bin");
        assert_eq!(n.pickle_index(), "pytorch_model.bin.index.fp16.json");
        assert_eq!(a.pickle_single(), "adapter_model.bin");
    }

    #[test]
    fn stale_shards_match_exact_stem_only() {
        let n = WeightsNames::new(WeightsKind::Model, None).unwrap();
        assert!(n.is_shard_of_this_stem("model-00001-of-00009.safetensors"));
        assert!(!n.is_shard_of_this_stem("model.fp16-00001-of-00009.safetensors"));
        assert!(!n.is_shard_of_this_stem("modelX-00001-of-00002.safetensors"));
        assert!(!n.is_shard_of_this_stem("model-00001-of-00009.safetensors.bak"));
        assert!(!n.is_shard_of_this_stem("model.safetensors"));
    }
}
