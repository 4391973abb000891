//! Opening a checkpoint on disk: a single file, or a sharded folder with its index, with or
//! without a variant. Only headers are read; tensors are handles that read their bytes later.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use indexmap::IndexMap;

use crate::config::{GenerationConfig, ModelConfig, GENERATION_CONFIG_NAME, MODEL_CONFIG_NAME};
use crate::error::{CheckpointError, Result};
use crate::index::WeightIndex;
use crate::names::{WeightsKind, WeightsNames};
use crate::safetensors_file::{
    inspect_file, open_file, FileProblem, SafetensorsHeader, TensorHeader,
};
use crate::tensor::{StateDict, Tensor};

/// How the weights of a checkpoint are laid out on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileLayout {
    /// One safetensors file.
    Single {
        /// The file.
        file: PathBuf,
    },
    /// Shards listed by an index.
    Sharded {
        /// The index file.
        index: PathBuf,
        /// The shard files in index order (sorted by name).
        shards: Vec<PathBuf>,
    },
}

/// How a weight file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A safetensors file.
    Safetensors,
    /// A `torch.save`d state dict (`pytorch_model.bin`), read by a restricted unpickler.
    Pickle,
}

/// One opened weight file.
#[derive(Debug, Clone)]
pub struct WeightFile {
    /// Path of the file.
    pub path: PathBuf,
    /// Its validated header. For a pickle file, the header a safetensors file of the same
    /// tensors would have (no metadata; `data_offsets` are the tensors' sizes laid end to end
    /// in the state dict's order, not positions in the file).
    pub header: SafetensorsHeader,
    /// Safetensors or pickle.
    pub format: WeightFormat,
}

/// A checkpoint whose headers have been read and validated.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The folder (or, for a lone file, its parent).
    pub dir: PathBuf,
    /// Single file or sharded.
    pub layout: FileLayout,
    /// The index, for sharded checkpoints.
    pub index: Option<WeightIndex>,
    /// Every weight file, in shard order.
    pub files: Vec<WeightFile>,
    tensors: IndexMap<String, (Tensor, usize)>,
    ties: Vec<(String, String)>,
}

/// Where to look for weights: the file names of a kind and variant.
pub fn find_file_layout(
    dir: &Path,
    kind: WeightsKind,
    variant: Option<&str>,
) -> Result<FileLayout> {
    locate(dir, kind, variant).map(|(layout, _)| layout)
}

/// [`find_file_layout`], with the index it read to find the shards (so that opening a
/// checkpoint reads it once).
fn locate(
    dir: &Path,
    kind: WeightsKind,
    variant: Option<&str>,
) -> Result<(FileLayout, Option<WeightIndex>)> {
    let names = WeightsNames::new(kind, variant)?;
    let single = dir.join(names.single());
    let index = dir.join(names.index());
    // transformers looks for the single file before the index; `verify` reports the case
    // where both exist (the single file then shadows the shards).
    if single.is_file() {
        return Ok((FileLayout::Single { file: single }, None));
    }
    if index.is_file() {
        return sharded_layout(dir, index).map(|(layout, idx)| (layout, Some(idx)));
    }
    // Pickle weights, which transformers reads only when no safetensors file is there.
    let (single, index) = (
        dir.join(names.pickle_single()),
        dir.join(names.pickle_index()),
    );
    if single.is_file() {
        return Ok((FileLayout::Single { file: single }, None));
    }
    if index.is_file() {
        return sharded_layout(dir, index).map(|(layout, idx)| (layout, Some(idx)));
    }
    Err(CheckpointError::NotACheckpoint {
        path: dir.to_owned(),
        expected: format!(
            "{}, {}, {} or {}",
            names.single(),
            names.index(),
            names.pickle_single(),
            names.pickle_index()
        ),
        hint: why_not_a_checkpoint(dir, variant),
    })
}

/// The shards an index lists, each resolved inside `dir`, sorted; and the index.
fn sharded_layout(dir: &Path, index: PathBuf) -> Result<(FileLayout, WeightIndex)> {
    let idx = WeightIndex::read(&index)?;
    let mut shards: Vec<PathBuf> = Vec::new();
    for p in resolve_index(dir, &idx).into_values() {
        let p = p.map_err(|reason| CheckpointError::InvalidIndex {
            path: index.clone(),
            reason,
        })?;
        if !shards.contains(&p) {
            shards.push(p);
        }
    }
    shards.sort();
    Ok((FileLayout::Sharded { index, shards }, idx))
}

/// What a folder without the expected weight files holds instead, and what to do about it:
/// a repo id given for a path, pickle `.bin` weights, or variant files without `--variant`.
fn why_not_a_checkpoint(dir: &Path, variant: Option<&str>) -> String {
    let Ok(entries) = std::fs::read_dir(dir) else {
        let text = dir.to_string_lossy();
        return match crate::hub::RepoSpec::parse(&text) {
            Some(_) => format!("; there is no such folder, and `{text}` looks like a Hugging Face repo id: resolve it from the local Hugging Face cache first (peftkit_checkpoint::resolve_model_path, which every peftkit verb uses)"),
            None => "; there is no such folder".to_owned(),
        };
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let mut variants: Vec<&str> = names.iter().filter_map(|n| variant_of(n)).collect();
    variants.sort();
    variants.dedup();
    variants.retain(|v| Some(*v) != variant);
    match variants.as_slice() {
        [] => String::new(),
        found => format!(
            "; it holds the variant(s) {}: pass --variant {}",
            found.join(", "),
            found[0]
        ),
    }
}

/// The variant of a weight file name: `fp16` of `model.fp16.safetensors`,
/// `model.fp16-00001-of-00002.safetensors` or `model.safetensors.index.fp16.json`.
fn variant_of(name: &str) -> Option<&str> {
    if let Some(v) = name
        .strip_prefix("model.safetensors.index.")
        .and_then(|r| r.strip_suffix(".json"))
    {
        return Some(v);
    }
    let stem = name.strip_prefix("model.")?.strip_suffix(".safetensors")?;
    let v = stem.split_once('-').map_or(stem, |(v, _)| v);
    (!v.is_empty()).then_some(v)
}

/// The files an index names, each resolved once to a path inside `dir` ([`resolve_under`]):
/// an index has one entry per tensor, thousands in a large model, and resolving follows every
/// link of the path (a `realpath` per entry, four times over while a merge opened its base,
/// took 2–3 ms of its start).
fn resolve_index(
    dir: &Path,
    idx: &WeightIndex,
) -> BTreeMap<String, std::result::Result<PathBuf, String>> {
    let real_dir = dir.canonicalize().ok();
    let mut resolved = BTreeMap::new();
    for file in idx.weight_map.values() {
        if !resolved.contains_key(file) {
            let r = resolve_under(dir, real_dir.as_deref(), file);
            resolved.insert(file.clone(), r);
        }
    }
    resolved
}

/// An index entry resolved to a path inside `dir` (`real_dir` is `dir` made canonical, if it
/// could be), refusing anything that could escape it: absolute paths, `..`, and symbolic links
/// that point outside.
fn resolve_under(
    dir: &Path,
    real_dir: Option<&Path>,
    file: &str,
) -> std::result::Result<PathBuf, String> {
    let rel = Path::new(file);
    if file.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("weight_map names `{file}`, which is not a plain file name inside the checkpoint folder"));
    }
    let path = dir.join(rel);
    if let (Ok(real), Some(real_dir)) = (path.canonicalize(), real_dir) {
        let in_blobs = crate::hub::snapshot_blobs(real_dir).is_some_and(|b| real.starts_with(b));
        if !real.starts_with(real_dir) && !in_blobs {
            return Err(format!(
                "weight_map names `{file}`, a link that leads outside the checkpoint folder to {}",
                real.display()
            ));
        }
    }
    Ok(path)
}

impl Checkpoint {
    /// Opens the model weights of `path`: a `.safetensors` file, or a folder holding
    /// `model.safetensors` or a sharded index.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_kind(path, WeightsKind::Model, None)
    }

    /// Opens `path` with an explicit weights kind and variant.
    pub fn open_kind(path: &Path, kind: WeightsKind, variant: Option<&str>) -> Result<Self> {
        if path.is_file() {
            let dir = path.parent().map(Path::to_owned).unwrap_or_default();
            let layout = FileLayout::Single {
                file: path.to_owned(),
            };
            return Self::from_layout(dir, layout, None);
        }
        let (layout, index) = locate(path, kind, variant)?;
        Self::from_layout(path.to_owned(), layout, index)
    }

    /// The checkpoint of `layout`, whose index (when sharded) is `index` if already read.
    fn from_layout(dir: PathBuf, layout: FileLayout, index: Option<WeightIndex>) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors: IndexMap<String, (Tensor, usize)> = IndexMap::new();
        let mut ties = Vec::new();
        let (paths, index) = match &layout {
            FileLayout::Single { file } => (vec![file.clone()], None),
            FileLayout::Sharded {
                index: path,
                shards,
            } => {
                let idx = match index {
                    Some(idx) => idx,
                    None => WeightIndex::read(path)?,
                };
                (shards.clone(), Some((path.clone(), idx)))
            }
        };
        for (i, path) in paths.iter().enumerate() {
            let (file, list, file_ties) = open_weight_file(path)?;
            ties.extend(file_ties);
            for (name, t) in list {
                if tensors.insert(name.clone(), (t, i)).is_some() {
                    return Err(CheckpointError::InvalidTensor {
                        path: path.clone(),
                        tensor: name,
                        reason: "also stored in another shard".into(),
                    });
                }
            }
            files.push(file);
        }
        if let Some((index_path, idx)) = &index {
            let problems = index_problems(&dir, idx, &files);
            if let Some(p) = problems.into_iter().next() {
                return Err(CheckpointError::InvalidIndex {
                    path: index_path.clone(),
                    reason: p,
                });
            }
        }
        Ok(Checkpoint {
            dir,
            layout,
            index: index.map(|(_, i)| i),
            files,
            tensors,
            ties,
        })
    }

    /// Tied weights a pickle file stores twice, as `(target, source)`: a later name that is
    /// the very view of one storage an earlier name is (`torch.save` of a tied model's state
    /// dict holds both `lm_head.weight` and `model.embed_tokens.weight`). A save declares them
    /// ([`crate::SaveOptions::tied_weights`]) so that the target is dropped, as transformers
    /// drops it. Empty for safetensors checkpoints, which never hold a tie twice.
    pub fn ties(&self) -> &[(String, String)] {
        &self.ties
    }

    /// The checkpoint as transformers holds it once loaded: each tie target of [`Self::ties`]
    /// removed, since the model has one parameter for both names (and a save writes it once).
    pub fn without_tie_targets(mut self) -> Self {
        for (target, _) in std::mem::take(&mut self.ties) {
            self.tensors.shift_remove(&target);
        }
        self
    }

    /// Whether any weight file is a pickle (`.bin`).
    pub fn is_pickle(&self) -> bool {
        self.files.iter().any(|f| f.format == WeightFormat::Pickle)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).map(|(t, _)| t)
    }

    /// Replaces the handle of tensor `name`, which keeps its file and place (a merge puts a
    /// lazily converted view of a tensor there, such as a dequantized weight). Returns the
    /// previous handle; without a tensor of that name nothing changes and `None` is returned.
    pub fn replace_tensor(&mut self, name: &str, tensor: Tensor) -> Option<Tensor> {
        let slot = self.tensors.get_mut(name)?;
        Some(std::mem::replace(&mut slot.0, tensor))
    }

    /// Removes tensor `name` from the handles (the files, their headers and the index are left
    /// as they are), keeping the order of the others.
    pub fn remove_tensor(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.shift_remove(name).map(|(t, _)| t)
    }

    /// The file a tensor is stored in.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|(_, i)| self.files[*i].path.as_path())
    }

    /// Tensors in storage order: shard by shard, each in data order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, (t, _))| (n.as_str(), t))
    }

    /// The tensors as a state dict in storage order.
    pub fn state_dict(&self) -> StateDict {
        self.tensors()
            .map(|(n, t)| (n.to_owned(), t.clone()))
            .collect()
    }

    /// The tensors in the order transformers iterates a model loaded by `from_pretrained`:
    /// stably sorted by `dot_natural_key`.
    pub fn natural_state_dict(&self) -> StateDict {
        let mut sd = self.state_dict();
        sd.sort_by(|a, _, b, _| crate::natural::natural_cmp(a, b));
        sd
    }

    /// Header metadata of the first file (`{"format": "pt"}` for transformers checkpoints).
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.files.first().and_then(|f| f.header.metadata.as_ref())
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|(t, _)| t.byte_len() as u64)
            .sum()
    }
}

/// A weight file, its tensors and the ties it stores twice.
type OpenedFile = (WeightFile, Vec<(String, Tensor)>, Vec<(String, String)>);

/// Opens one weight file, safetensors or pickle (by its name), with its tensors.
fn open_weight_file(path: &Path) -> Result<OpenedFile> {
    if !crate::pickle::is_pickle_name(path) {
        let (header, list) = open_file(path)?;
        let file = WeightFile {
            path: path.to_owned(),
            header,
            format: WeightFormat::Safetensors,
        };
        return Ok((file, list, Vec::new()));
    }
    let weights = crate::pickle::open_pickle(path)?;
    let mut at = 0u64;
    let tensors = weights
        .tensors
        .iter()
        .map(|(name, t)| {
            let end = at + t.byte_len() as u64;
            let h = TensorHeader {
                name: name.clone(),
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data_offsets: (at, end),
            };
            at = end;
            h
        })
        .collect();
    let header = SafetensorsHeader {
        metadata: None,
        tensors,
        data_start: 0,
    };
    let file = WeightFile {
        path: path.to_owned(),
        header,
        format: WeightFormat::Pickle,
    };
    Ok((file, weights.tensors, weights.ties))
}

/// Everything inconsistent between an index and the headers of its files.
pub(crate) fn index_problems(dir: &Path, idx: &WeightIndex, files: &[WeightFile]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut stored: HashMap<&str, Vec<&Path>> = HashMap::new();
    for f in files {
        for t in &f.header.tensors {
            stored.entry(t.name.as_str()).or_default().push(&f.path);
        }
    }
    let resolved = resolve_index(dir, idx);
    for (name, file) in &idx.weight_map {
        let Some(Ok(expected)) = resolved.get(file) else {
            continue;
        };
        match stored.get(name.as_str()) {
            None => problems.push(format!(
                "weight_map lists `{name}` in {file}, but no shard holds it"
            )),
            Some(paths) if !paths.iter().any(|p| p == expected) => problems.push(format!(
                "weight_map puts `{name}` in {file}, but it is stored in {}",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            _ => {}
        }
    }
    for (name, paths) in &stored {
        if !idx.weight_map.contains_key(*name) {
            problems.push(format!(
                "{} holds `{name}`, which the weight_map does not list",
                paths[0].display()
            ));
        }
        if paths.len() > 1 {
            problems.push(format!(
                "`{name}` is stored more than once: {}",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    // A pickle index counts a tied storage once; its tensors count it per name.
    let pickle = files.iter().any(|f| f.format == WeightFormat::Pickle);
    if let (Some(total), false) = (idx.total_size, pickle) {
        let actual: u64 = files
            .iter()
            .flat_map(|f| &f.header.tensors)
            .map(|t| t.data_offsets.1 - t.data_offsets.0)
            .sum();
        if total != actual {
            problems.push(format!(
                "metadata.total_size is {total} but the shards hold {actual} bytes of tensors"
            ));
        }
    }
    problems.sort();
    problems
}

/// One problem `verify` found: the file it is in, the tensor if it concerns one, and what is
/// wrong. Displayed as the line `peftkit verify` prints (`FILE: tensor `T`: MESSAGE`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The file (or, for a folder-level problem, the folder).
    pub file: PathBuf,
    /// The tensor concerned, if any.
    pub tensor: Option<String>,
    /// What is wrong, and where it helps, what to do.
    pub message: String,
}

impl Problem {
    /// A problem of `file`.
    pub fn new(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Problem {
            file: file.into(),
            tensor: None,
            message: message.into(),
        }
    }

    /// A problem of `file` told by an error whose message may start with the file's name
    /// (which is then not repeated).
    pub fn from_error(file: impl Into<PathBuf>, err: &dyn std::fmt::Display) -> Self {
        let file = file.into();
        let text = err.to_string();
        let prefix = format!("{}: ", file.display());
        let message = text.strip_prefix(&prefix).unwrap_or(&text).to_owned();
        Problem::new(file, message)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(t) = &self.tensor {
            write!(f, "tensor `{t}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// The JSON types a loader relies on in `config.json`: (field, what it must be, check).
type FieldCheck = (&'static str, &'static str, fn(&serde_json::Value) -> bool);
const CONFIG_FIELD_TYPES: &[FieldCheck] = &[
    ("model_type", "a string", |v| v.is_string()),
    ("architectures", "a list of strings or null", |v| {
        v.is_null()
            || v.as_array()
                .is_some_and(|a| a.iter().all(|x| x.is_string()))
    }),
    ("tie_word_embeddings", "true or false", |v| v.is_boolean()),
    ("dtype", "a string or null", |v| {
        v.is_null() || v.is_string()
    }),
    ("torch_dtype", "a string or null", |v| {
        v.is_null() || v.is_string()
    }),
];

/// Problems with the model configs of folder `path`: a `config.json` or
/// `generation_config.json` that is present but not a JSON object, or a `config.json` field a
/// loader reads with the wrong JSON type. Every loader (and every other verb) would refuse them.
fn config_problems(path: &Path) -> Vec<Problem> {
    let mut problems = Vec::new();
    if !path.is_dir() {
        return problems;
    }
    let config = path.join(MODEL_CONFIG_NAME);
    if config.is_file() {
        match ModelConfig::read(&config) {
            Err(e) => problems.push(Problem::from_error(&config, &e)),
            Ok(c) => {
                for (field, want, ok) in CONFIG_FIELD_TYPES {
                    match c.fields.get(*field) {
                        Some(v) if !ok(v) => problems.push(Problem::new(
                            &config,
                            format!("`{field}` is {v}, but loaders read it as {want}"),
                        )),
                        _ => {}
                    }
                }
            }
        }
    }
    let generation = path.join(GENERATION_CONFIG_NAME);
    if generation.is_file() {
        if let Err(e) = GenerationConfig::read(&generation) {
            problems.push(Problem::from_error(&generation, &e));
        }
    }
    problems
}

/// Every problem of a checkpoint folder or file, for `peftkit verify`, as lines (see
/// [`verify_problems`]).
pub fn verify(path: &Path, kind: WeightsKind, variant: Option<&str>) -> Result<Vec<String>> {
    Ok(verify_problems(path, kind, variant)?
        .iter()
        .map(Problem::to_string)
        .collect())
}

/// Every problem of a checkpoint folder or file: configs a loader would refuse, unreadable or
/// inconsistent headers (offsets, dtype × shape, truncation), index entries that are missing,
/// duplicated across shards, misplaced or escape the folder, and a stale single file that
/// shadows an index.
///
/// ```
/// use peftkit_checkpoint::{verify_problems, WeightsKind};
/// let dir = tempfile::tempdir().unwrap();
/// let problems = verify_problems(dir.path(), WeightsKind::Model, None).unwrap();
/// assert!(problems[0].message.contains("no checkpoint found"));
/// ```
///
/// # Errors
/// An I/O error reading a file that exists, or an invalid `variant`.
pub fn verify_problems(
    path: &Path,
    kind: WeightsKind,
    variant: Option<&str>,
) -> Result<Vec<Problem>> {
    let mut problems = config_problems(path);
    let (dir, layout) = if path.is_file() {
        (
            path.parent().map(Path::to_owned).unwrap_or_default(),
            FileLayout::Single {
                file: path.to_owned(),
            },
        )
    } else {
        let names = WeightsNames::new(kind, variant)?;
        let (single, index) = (path.join(names.single()), path.join(names.index()));
        if single.is_file() && index.is_file() {
            problems.push(Problem::new(path, format!(
                "both {} and {} exist: loaders read the single file and ignore the shards; delete the stale one",
                names.single(),
                names.index()
            )));
        }
        match find_file_layout(path, kind, variant) {
            Ok(l) => (path.to_owned(), l),
            Err(e) => {
                let file = match &e {
                    CheckpointError::InvalidIndex { path, .. } => path.clone(),
                    _ => path.to_owned(),
                };
                problems.push(Problem::from_error(file, &e));
                return Ok(problems);
            }
        }
    };
    let (paths, index) = match &layout {
        FileLayout::Single { file } => (vec![file.clone()], None),
        FileLayout::Sharded { index, .. } => {
            let idx = WeightIndex::read(index)?;
            let mut paths = Vec::new();
            for p in resolve_index(&dir, &idx).into_values() {
                match p {
                    Ok(p) if !paths.contains(&p) => paths.push(p),
                    Ok(_) => {}
                    Err(reason) => {
                        let p = Problem::new(index, reason);
                        if !problems.contains(&p) {
                            problems.push(p);
                        }
                    }
                }
            }
            paths.sort();
            (paths, Some((index.clone(), idx)))
        }
    };
    let mut files = Vec::new();
    for p in &paths {
        if !p.is_file() {
            problems.push(Problem::new(p, "listed in the index but missing"));
            continue;
        }
        if crate::pickle::is_pickle_name(p) {
            match open_weight_file(p) {
                Ok((file, _, _)) => files.push(file),
                Err(e) => problems.push(Problem::from_error(p, &e)),
            }
            continue;
        }
        let (header, file_problems) = inspect_file(p)?;
        problems.extend(
            file_problems
                .into_iter()
                .map(|FileProblem { tensor, reason }| Problem {
                    file: p.clone(),
                    tensor,
                    message: reason,
                }),
        );
        if let Some(header) = header {
            files.push(WeightFile {
                path: p.clone(),
                header,
                format: WeightFormat::Safetensors,
            });
        }
    }
    if let Some((index_path, idx)) = index {
        problems.extend(
            index_problems(&dir, &idx, &files)
                .into_iter()
                .map(|p| Problem::new(&index_path, p)),
        );
    }
    Ok(problems)
}
