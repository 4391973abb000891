//! Repo ids (`org/name[@revision]`) resolved from the local Hugging Face cache, offline, as
//! huggingface_hub lays it out:
//!
//! ```text
//! $HF_HUB_CACHE/models--org--name/
//!     refs/main                  the commit a branch or tag points at (a 40-hex text file)
//!     snapshots/<commit>/...     the files of that commit, symbolic links into blobs/
//!     blobs/<hash>
//! ```
//!
//! The cache is `HF_HUB_CACHE` (or its older name `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`,
//! else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. A revision is a
//! branch or tag (read from `refs/`), or a full commit hash (a snapshot folder); none means
//! `main`.
//!
//! Written here rather than with the `hf-hub` crate: that crate is a download client (it needs
//! an HTTP stack and resolves revisions against the Hub), while this is a few path lookups
//! that must work with no network at all.

use std::path::{Component, Path, PathBuf};

use crate::error::{CheckpointError, Result};

/// A model repo id with an optional revision: `org/name` or `org/name@revision`.
///
/// ```
/// use peftkit_checkpoint::RepoSpec;
/// let spec = RepoSpec::parse("meta-llama/Llama-3.2-1B@v1.0").unwrap();
/// assert_eq!(spec.repo_id, "meta-llama/Llama-3.2-1B");
/// assert_eq!(spec.revision.as_deref(), Some("v1.0"));
/// assert!(RepoSpec::parse("./models/llama").is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    /// `org/name`.
    pub repo_id: String,
    /// A branch, tag or full commit hash; `None` for `main`.
    pub revision: Option<String>,
}

impl RepoSpec {
    /// Parses `org/name[@revision]`; `None` when the text is not of that form (a path).
    pub fn parse(text: &str) -> Option<Self> {
        let (repo, revision) = match text.split_once('@') {
            Some((r, rev)) => (r, Some(rev)),
            None => (text, None),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
                && !p.contains("--")
                && !p.contains("..")
        };
        if !part_ok(org) || !part_ok(name) {
            return None;
        }
        if let Some(rev) = revision {
            let plain = Path::new(rev)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            if rev.is_empty() || !plain || rev.ends_with('/') {
                return None;
            }
        }
        Some(RepoSpec {
            repo_id: repo.to_owned(),
            revision: revision.map(str::to_owned),
        })
    }

    /// The `hf download` command that puts this repo in the cache.
    pub fn download_command(&self) -> String {
        match &self.revision {
            Some(rev) => format!("hf download {} --revision {rev}", self.repo_id),
            None => format!("hf download {}", self.repo_id),
        }
    }
}

impl std::fmt::Display for RepoSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{}@{rev}", self.repo_id),
            None => f.write_str(&self.repo_id),
        }
    }
}

/// The local Hugging Face hub cache.
///
/// ```
/// use peftkit_checkpoint::{HubCache, RepoSpec};
/// let cache = HubCache::at("/nowhere");
/// let err = cache.resolve(&RepoSpec::parse("org/model").unwrap()).unwrap_err();
/// assert!(err.to_string().contains("hf download org/model"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    root: PathBuf,
}

impl HubCache {
    /// The cache huggingface_hub uses in this environment (see the module docs).
    pub fn from_env() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(expand_home)
        };
        let root = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .unwrap_or_else(|| {
                var("XDG_CACHE_HOME")
                    .unwrap_or_else(|| expand_home("~/.cache".into()))
                    .join("huggingface")
                    .join("hub")
            });
        HubCache { root }
    }

    /// A cache at `root` (the folder holding `models--*`).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        HubCache { root: root.into() }
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The snapshot folder of `spec`, as `snapshot_download(..., local_files_only=True)`
    /// returns it; an error naming the cache and the `hf download` command otherwise.
    pub fn resolve(&self, spec: &RepoSpec) -> Result<PathBuf> {
        let missing = |reason: String| CheckpointError::NotInHubCache {
            repo: spec.to_string(),
            cache: self.root.clone(),
            reason,
            command: spec.download_command(),
        };
        let repo = self
            .root
            .join(format!("models--{}", spec.repo_id.replace('/', "--")));
        if !repo.is_dir() {
            return Err(missing(format!("there is no {}", file_name(&repo))));
        }
        let revision = spec.revision.as_deref().unwrap_or("main");
        let commit = if is_commit_hash(revision) {
            revision.to_owned()
        } else {
            let r = repo.join("refs").join(revision);
            let text = std::fs::read_to_string(&r).map_err(|_| {
                missing(format!(
                    "revision `{revision}` was never downloaded (no refs/{revision})"
                ))
            })?;
            let commit = text.trim().to_owned();
            if !is_commit_hash(&commit) {
                return Err(CheckpointError::InvalidJson {
                    path: r,
                    reason: "a cache ref that is not a 40-hex commit hash".into(),
                });
            }
            commit
        };
        let snapshot = repo.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(missing(format!(
                "revision `{revision}` (commit {commit}) has no snapshot folder"
            )));
        }
        Ok(snapshot)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn expand_home(p: std::ffi::OsString) -> PathBuf {
    let p = PathBuf::from(p);
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p,
    }
}

/// Where a command-line argument naming a checkpoint or adapter points: the path itself when
/// it exists (a local folder always wins), else the snapshot of the repo id it spells in
/// [`HubCache::from_env`], else the path unchanged (for the caller to report missing).
///
/// ```
/// use std::path::Path;
/// use peftkit_checkpoint::resolve_model_path;
/// assert_eq!(resolve_model_path(".").unwrap(), Path::new("."));
/// assert!(resolve_model_path("surely-no-org/surely-no-model").is_err());
/// ```
pub fn resolve_model_path(arg: &str) -> Result<PathBuf> {
    let path = PathBuf::from(arg);
    if path.exists() {
        return Ok(path);
    }
    match RepoSpec::parse(arg) {
        Some(spec) => HubCache::from_env().resolve(&spec),
        None => Ok(path),
    }
}

/// The `blobs/` folder a snapshot's links point into, when `real_dir` (canonical) is a
/// snapshot of the hub cache: files there are links that leave the snapshot folder by design.
pub(crate) fn snapshot_blobs(real_dir: &Path) -> Option<PathBuf> {
    let snapshots = real_dir.parent()?;
    let repo = snapshots.parent()?;
    let is_repo = file_name(repo).starts_with("models--");
    (file_name(snapshots) == "snapshots" && is_repo).then(|| repo.join("blobs"))
}
