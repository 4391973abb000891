//! Staging folders: who owns them, and removing the ones nobody owns any more.
//!
//! A save is assembled in a hidden folder beside its target (see [`crate::DirTransaction`]),
//! named `.NAME.peftkit-staging-PID-XXXXXX`: the owning process id, then a random part. The
//! owner holds an exclusive `flock` on the folder for as long as the save runs; the kernel
//! drops the lock when the process dies, however it dies (SIGKILL included). A folder is
//! *stale* when its lock is free and its process is gone; [`remove_stale_staging`] removes
//! those beside a target before a save starts, so a killed run never leaves its partial
//! output behind for good.
//!
//! The id alone would not do (ids are reused), nor the lock alone (a folder is created a
//! moment before it is locked): a folder counts as stale only when both say so.
//!
//! The folders of the running process are also registered here, so that a signal handler can
//! remove them before the process exits ([`abandon_staging`]).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{CheckpointError, Result};

/// The part of a staging folder's name between the target's name and the owner's id.
pub(crate) const STAGING_MARK: &str = ".peftkit-staging-";

/// A staging folder left by a process that no longer runs, removed by
/// [`remove_stale_staging`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleStaging {
    /// The folder that was removed.
    pub path: PathBuf,
    /// The process that created it, when its name says (older peftkit versions did not).
    pub pid: Option<u32>,
}

impl std::fmt::Display for StaleStaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "removed stale staging folder {}", self.path.display())?;
        match self.pid {
            Some(pid) => write!(f, " (left by process {pid}, which no longer runs)"),
            None => write!(f, " (left by a process that no longer runs)"),
        }
    }
}

/// The prefix of the staging folders of target folder name `name` created by this process.
pub(crate) fn staging_prefix(name: &str) -> String {
    format!(".{name}{STAGING_MARK}{}-", std::process::id())
}

/// Takes the exclusive lock that marks `dir` as owned by this process. The lock lasts as
/// long as the returned file is open.
pub(crate) fn lock(dir: &Path) -> Result<File> {
    let f = File::open(dir).map_err(|e| CheckpointError::io(dir, e))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| CheckpointError::io(dir, e.into()))?;
    Ok(f)
}

/// Takes a shared lock on `dir`: several processes may hold it at once (the ranks of a
/// distributed save), and while any does, [`remove_stale_staging`]'s exclusive lock fails, so
/// the folder is left alone.
pub(crate) fn lock_shared(dir: &Path) -> Result<File> {
    let f = File::open(dir).map_err(|e| CheckpointError::io(dir, e))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared)
        .map_err(|e| CheckpointError::io(dir, e.into()))?;
    Ok(f)
}

/// The owner id in a staging folder name (`.NAME.peftkit-staging-PID-XXXXXX`), or `None` for
/// the older form without one.
fn owner_of(name: &str) -> Option<u32> {
    let (_, rest) = name.rsplit_once(STAGING_MARK)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Whether process `pid` exists (a process of another user counts: it may own the folder).
fn alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

/// Removes every stale staging folder (of any target) in the folder that holds `target`, and
/// says which. A folder still locked, or whose owner still runs, is left alone.
///
/// ```
/// use peftkit_checkpoint::remove_stale_staging;
/// let dir = tempfile::tempdir().unwrap();
/// // A folder left by a process that no longer runs (pid 0 never names one).
/// std::fs::create_dir(dir.path().join(".out.peftkit-staging-0-abc123")).unwrap();
/// let removed = remove_stale_staging(&dir.path().join("out")).unwrap();
/// assert_eq!(removed.len(), 1);
/// assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
/// ```
///
/// # Errors
/// An I/O error removing a stale folder (a folder that cannot be listed yields no error: there
/// is nothing to clean there).
pub fn remove_stale_staging(target: &Path) -> Result<Vec<StaleStaging>> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(vec![]);
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') || !name.contains(STAGING_MARK) {
            continue;
        }
        let pid = owner_of(&name);
        if pid == Some(std::process::id()) || pid.is_some_and(alive) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        // Held while removing, so that no second cleaner races this one.
        let _guard = match is_dir {
            true => match lock(&path) {
                Ok(f) => Some(f),
                Err(_) => continue,
            },
            false => None,
        };
        let gone = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match gone {
            Ok(()) => removed.push(StaleStaging { path, pid }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CheckpointError::io(&path, e)),
        }
    }
    removed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(removed)
}

/// The staging folders of this process's running saves.
pub(crate) struct Registry {
    /// Folders being written: a save's partial output.
    partial: Vec<PathBuf>,
    /// Folders holding a target's old content after its save swapped the new one in, about
    /// to be removed.
    old: Vec<PathBuf>,
}

impl Registry {
    /// `dir` is no staging folder any more (it was renamed to its target).
    pub(crate) fn forget(&mut self, dir: &Path) {
        self.partial.retain(|d| d != dir);
    }

    /// `dir`, a partial output until now, holds the old content of its target (the swap is
    /// done): a signal now removes it without calling it a partial output.
    pub(crate) fn swapped(&mut self, dir: &Path, old: &Path) {
        self.partial.retain(|d| d != dir);
        self.old.push(old.to_owned());
    }
}

static ACTIVE: Mutex<Registry> = Mutex::new(Registry {
    partial: Vec::new(),
    old: Vec::new(),
});

/// The registry, also after a panic elsewhere (it is a plain list).
pub(crate) fn active() -> MutexGuard<'static, Registry> {
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn register(dir: &Path) {
    active().partial.push(dir.to_owned());
}

pub(crate) fn unregister(dir: &Path) {
    let mut registry = active();
    registry.partial.retain(|d| d != dir);
    registry.old.retain(|d| d != dir);
}

/// Removes the staging folders of every save this process is running, for a signal handler
/// about to exit (SIGINT, SIGTERM): the targets stay as they were. Saves still running in
/// other threads then fail; the caller is expected to exit at once. The registry stays locked
/// until the process exits, so that no save can swap its folder in after this call.
///
/// Returns the partial outputs removed; the old content of a target whose save had already
/// swapped the new one in is removed too, but is not one (that target holds the new output).
pub fn abandon_staging() -> Vec<PathBuf> {
    let mut guard = active();
    let mut removed = Vec::new();
    let old: Vec<PathBuf> = guard.old.drain(..).collect();
    for (dir, partial) in guard
        .partial
        .drain(..)
        .map(|d| (d, true))
        .chain(old.into_iter().map(|d| (d, false)))
    {
        // Writers may still create files while the tree is removed: try a few times.
        for _ in 0..5 {
            match fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
                _ => break,
            }
        }
        if partial {
            removed.push(dir);
        }
    }
    std::mem::forget(guard);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_read_from_the_name() {
        assert_eq!(owner_of(".m.peftkit-staging-123-abc"), Some(123));
        assert_eq!(owner_of(".a-b.peftkit-staging-7-x-y"), Some(7));
        assert_eq!(owner_of(".m.peftkit-staging-abc"), None);
    }

    #[test]
    fn locked_or_owned_folders_are_kept_and_dead_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        // Ours (this process runs), a locked one of a dead id, a dead one, an old-form one.
        let ours = dir.path().join(staging_prefix("out") + "aaa");
        let locked = dir.path().join(".out.peftkit-staging-0-bbb");
        let dead = dir.path().join(".x.peftkit-staging-0-ccc");
        let old = dir.path().join(".out.peftkit-staging-ddd");
        for d in [&ours, &locked, &dead, &old] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("f"), "x").unwrap();
        }
        fs::create_dir(dir.path().join("unrelated")).unwrap();
        let _held = lock(&locked).unwrap();
        let removed = remove_stale_staging(&target).unwrap();
        let paths: Vec<_> = removed.iter().map(|s| s.path.clone()).collect();
        assert_eq!(paths, vec![old.clone(), dead.clone()]);
        assert_eq!(removed[1].pid, Some(0));
        assert!(ours.exists() && locked.exists() && !dead.exists() && !old.exists());
        assert!(removed[1].to_string().contains("process 0"));
    }

    #[test]
    fn abandon_removes_registered_folders() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        fs::create_dir(&s).unwrap();
        // Not through `abandon_staging` (it keeps the registry locked for good): the same
        // removal and registry handling, observed.
        register(&s);
        assert!(active().partial.contains(&s));
        unregister(&s);
        assert!(!active().partial.contains(&s));
    }
}
