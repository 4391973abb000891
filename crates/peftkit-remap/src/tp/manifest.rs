//! `tensor_parallel.json`, the file `split` writes into every rank folder: which rank of how
//! many the folder is, and for every sharded tensor its style, full shape, sharded dim and the
//! ranges of that dim the rank holds. `gather` rebuilds the full checkpoint from it alone.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use peftkit_checkpoint::{py_json_string, PyJsonStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{RemapError, Result};

/// The manifest's file name in a rank folder.
pub const MANIFEST_NAME: &str = "tensor_parallel.json";

const FORMAT: &str = "peftkit-tensor-parallel";

/// The contents of `tensor_parallel.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankManifest {
    /// Always `peftkit-tensor-parallel`.
    pub format: String,
    /// Schema version, 1.
    pub version: u32,
    /// This folder's rank.
    pub rank: usize,
    /// How many ranks the checkpoint was split into.
    pub world_size: usize,
    /// The plan used (an architecture and model type, or a plan file).
    pub plan: String,
    /// The `metadata` of the source's index (sharded sources), restored by `gather`.
    pub source_index_metadata: Option<Map<String, Value>>,
    /// The weights variant of the source's files (`model.VARIANT.safetensors`), which the
    /// rank folders keep; absent (not `null`) for a source without one, so manifests of
    /// plain splits are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The sharded tensors, by on-disk name; every other tensor is replicated (whole in every
    /// rank).
    pub tensors: BTreeMap<String, ShardedTensor>,
}

/// One sharded tensor of a rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardedTensor {
    /// The parallel style of the parameter it belongs to.
    pub style: String,
    /// The full tensor's shape.
    pub shape: Vec<usize>,
    /// The sharded dim (of the on-disk tensor).
    pub dim: usize,
    /// The ranges of `dim` this rank holds, in the order it stores them (two for a packed
    /// `gate_up_proj`, none for a rank that holds nothing of it).
    pub ranges: Vec<[usize; 2]>,
}

impl ShardedTensor {
    /// The ranges as `Range`s.
    pub fn ranges(&self) -> Vec<Range<usize>> {
        self.ranges.iter().map(|[a, b]| *a..*b).collect()
    }
}

impl RankManifest {
    pub(crate) fn new(rank: usize, world_size: usize, plan: &str) -> Self {
        RankManifest {
            format: FORMAT.into(),
            version: 1,
            rank,
            world_size,
            plan: plan.to_owned(),
            source_index_metadata: None,
            variant: None,
            tensors: BTreeMap::new(),
        }
    }

    /// The file's bytes: sorted keys, two-space indent, as the other JSON files of a checkpoint.
    pub fn to_json_string(&self) -> String {
        let value = serde_json::to_value(self).expect("a manifest is plain data");
        py_json_string(
            &value,
            &PyJsonStyle {
                trailing_newline: true,
                ..Default::default()
            },
        )
    }

    /// Reads the manifest of rank folder `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_NAME);
        let what = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            RemapError::tp(
                &what,
                format!("{e}; a rank folder is one `peftkit split` wrote"),
            )
        })?;
        let m: RankManifest =
            serde_json::from_str(&text).map_err(|e| RemapError::tp(&what, e.to_string()))?;
        if m.format != FORMAT || m.version != 1 || m.rank >= m.world_size {
            return Err(RemapError::tp(
                &what,
                format!(
                    "not a version-1 {FORMAT} manifest with rank < world_size (format {}, version {}, rank {} of {})",
                    m.format, m.version, m.rank, m.world_size
                ),
            ));
        }
        Ok(m)
    }
}
