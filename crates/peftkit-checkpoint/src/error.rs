//! The one error type of this crate: every variant names the file and, where there is one,
//! the tensor, and says what to do.

use std::path::PathBuf;

/// Everything that can go wrong while reading, planning or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// An output folder that is, lies inside or contains an input: writing it would replace
    /// or disturb that input.
    #[error("--out {out} {overlap} the input {input}: choose an output folder outside every input (inputs are never modified)")]
    OutputOverlapsInput {
        /// The output asked for.
        out: PathBuf,
        /// The input it overlaps.
        input: PathBuf,
        /// How.
        overlap: crate::overlap::Overlap,
    },
    /// The caller's barrier of a distributed save failed (see [`crate::Barrier`]).
    #[error("rank {rank}: the barrier `{step}` of the distributed save of {dir} failed: {source}")]
    Barrier {
        /// The rank that waited.
        rank: usize,
        /// The step it waited at (`staging`, `shards`, `commit`).
        step: String,
        /// The output folder.
        dir: PathBuf,
        /// What the barrier reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A distributed save asked of a rank outside its world.
    #[error("rank {rank} of a world of {world_size}: a rank must be below the world size, which must be at least 1")]
    BadRank {
        /// The rank asked for.
        rank: usize,
        /// The world size.
        world_size: usize,
    },
    /// An in-place save whose output is not the input it replaces.
    #[error("an in-place save writes over its input: the output {out} is not the input {input}")]
    NotInPlace {
        /// The output asked for.
        out: PathBuf,
        /// The input to write over.
        input: PathBuf,
    },
    /// An operating-system error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The disk filled up, or the file-size limit (`ulimit -f`) was reached, during a save. The
    /// partial output was removed and the target folder is as it was.
    #[error("{path}: {source}; the save was abandoned and its partial files removed, {target} is as it was: free some space (or raise the file-size limit) and run again")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// The folder the save would have replaced.
        target: PathBuf,
        /// The underlying error (ENOSPC, EDQUOT or EFBIG).
        #[source]
        source: std::io::Error,
    },
    /// A safetensors header that cannot be trusted.
    #[error("{path}: invalid safetensors header: {reason}")]
    InvalidHeader {
        /// The file whose header is wrong.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// One tensor's entry in a safetensors header is wrong.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    InvalidTensor {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A sharded checkpoint's index is inconsistent with itself or with its shards.
    #[error("{path}: {reason}")]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A JSON file (config, index) that is not valid JSON or not of the expected shape.
    #[error("{path}: {reason}")]
    InvalidJson {
        /// The JSON file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A pickle weights file names a global that is not a tensor constructor: loading it
    /// with Python would call it. Nothing was run.
    #[error("{path}: refused: the pickle calls `{global}`, which is not a tensor constructor (only torch's tensor rebuilders, storage types, collections.OrderedDict and plain containers are allowed; nothing was run). If you trust this file, load it with torch and save it with safetensors")]
    RefusedGlobal {
        /// The `.bin` file.
        path: PathBuf,
        /// The global, `module.name` (`os.system`).
        global: String,
    },
    /// A pickle weights file that is not a `torch.save`d state dict peftkit can read.
    #[error("{path}: not a readable torch.save state dict: {reason}")]
    InvalidPickle {
        /// The `.bin` file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A repo id that the local Hugging Face cache does not hold.
    #[error("`{repo}` is not in the Hugging Face cache {cache}: {reason}. peftkit works offline: download it with `{command}` (or set HF_HUB_CACHE / HF_HOME to the cache that holds it, or pass a local folder)")]
    NotInHubCache {
        /// The repo id and revision asked for.
        repo: String,
        /// The cache searched.
        cache: PathBuf,
        /// What is missing.
        reason: String,
        /// The `hf download` command that would fetch it.
        command: String,
    },
    /// No weights were found where a checkpoint was expected.
    #[error("{path}: no checkpoint found: expected {expected}{hint}")]
    NotACheckpoint {
        /// The folder searched.
        path: PathBuf,
        /// The file names that were looked for.
        expected: String,
        /// What the folder holds instead and what to do, starting with `"; "` (or empty).
        hint: String,
    },
    /// A `max_shard_size` string that huggingface_hub would reject too.
    #[error("invalid shard size `{input}`: {reason}; accepted: a number of bytes (\"10000\") or a number with a decimal unit KB, MB, GB or TB, powers of 1000, any case, a space allowed (\"50GB\", \"500MB\", \"1.5 MB\", \"20kb\")")]
    InvalidShardSize {
        /// What the caller gave.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Two names of the state dict point at the same storage and no tie declares it.
    #[error("tensors `{first}` and `{second}` share storage but no tied-weights rule declares it; declare the tie (target -> source) or give each its own copy")]
    UndeclaredAliasing {
        /// The first name (in state-dict order).
        first: String,
        /// The second name.
        second: String,
    },
    /// A declared tie whose two tensors hold different values.
    #[error("tied weights `{target}` -> `{source_name}` differ in value; the checkpoint would load `{source_name}` into both. Untie them (set tie_word_embeddings=false and drop the tie) or pass one tensor")]
    TiedTensorsDiffer {
        /// The tie target that would be dropped.
        target: String,
        /// The tie source that would be kept.
        source_name: String,
    },
    /// Two tensors whose storages partly overlap cannot be written to safetensors.
    #[error("tensors `{first}` and `{second}` partly overlap in memory; safetensors cannot express that")]
    PartialOverlap {
        /// The first name.
        first: String,
        /// The second name.
        second: String,
    },
    /// The same tensor name appears twice.
    #[error("tensor `{0}` appears twice")]
    DuplicateTensor(String),
    /// A tensor's data does not have the length its dtype and shape require.
    #[error("tensor `{tensor}`: {reason}")]
    TensorData {
        /// The tensor's name (may be empty for anonymous tensors).
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// Computing a lazy tensor's bytes failed (a merge kernel refused its inputs, say). The
    /// producer's error keeps its type: reach it with [`std::error::Error::source`] and
    /// `downcast_ref`. The message, like [`CheckpointError::TensorData`]'s, names the tensor;
    /// the source's own message follows it in an error chain.
    #[error("tensor `{tensor}`: {context}")]
    TensorCompute {
        /// The tensor being computed.
        tensor: String,
        /// What was being done (`merging adapter/`).
        context: String,
        /// The producer's error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Nothing to save.
    #[error("the state dict is empty: there is nothing to save to {0}")]
    EmptyStateDict(PathBuf),
    /// The save target exists and is not a directory.
    #[error("{0} exists and is not a directory; choose another output path")]
    NotADirectory(PathBuf),
    /// A tensor the caller asked for is not in the checkpoint.
    #[error("{path}: no tensor named `{tensor}`")]
    MissingTensor {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// The missing name.
        tensor: String,
    },
}

impl CheckpointError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CheckpointError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
