//! Crash-safe saves of a whole folder.
//!
//! transformers writes files one by one into the target folder: a crash or an error half-way
//! leaves new shards beside old ones and an index that matches neither. Here a save is
//! assembled in a staging folder beside the target. On commit, the files of the old folder
//! that the save keeps (tokenizer, README, anything that is not replaced or stale) are
//! hard-linked into the staging folder, and the two folders are swapped in one atomic
//! `renameat2(RENAME_EXCHANGE)` on Linux. A reader sees the old folder or the new one, never a
//! mix. Where the exchange is not available, the old folder is renamed aside and the new one
//! renamed into place (a moment without the folder, still never a mix). If anything fails
//! before the commit, the staging folder is removed and the target is untouched.
//!
//! The staging folder carries its owner's process id and lock (see [`crate::remove_stale_staging`]):
//! a run killed before it could clean up leaves a folder the next save beside it removes.
//! A full disk or a file-size limit during the save is reported as
//! [`CheckpointError::NoSpace`], after the partial files are removed.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{CheckpointError, Result};
use crate::staging;

/// A folder being assembled beside its target.
#[derive(Debug)]
pub struct DirTransaction {
    target: PathBuf,
    staging: PathBuf,
    done: bool,
    durable: bool,
    /// The lock that tells other processes this staging folder is in use.
    _lock: fs::File,
}

impl DirTransaction {
    /// Starts a save into `target` (which may or may not exist yet), after removing the stale
    /// staging folders of dead processes beside it (call
    /// [`remove_stale_staging`](crate::remove_stale_staging) first to learn which).
    pub fn begin(target: &Path) -> Result<Self> {
        if target.exists() && !target.is_dir() {
            return Err(CheckpointError::NotADirectory(target.to_owned()));
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| CheckpointError::io(&parent, e))?;
        staging::remove_stale_staging(target)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let staging = tempfile::Builder::new()
            .prefix(&staging::staging_prefix(&name))
            .tempdir_in(&parent)
            .map_err(|e| CheckpointError::io(&parent, e))?
            .keep();
        let lock = match staging::lock(&staging) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_dir(&staging);
                return Err(e);
            }
        };
        staging::register(&staging);
        Ok(DirTransaction {
            target: target.to_owned(),
            staging,
            done: false,
            durable: true,
            _lock: lock,
        })
    }

    /// Starts a save into `target` assembled by several processes: the staging folder has the
    /// fixed name [`DirTransaction::shared_staging`] gives, so every rank of a distributed save
    /// finds it without being told. A stale one (a save that crashed: its lock is free) is
    /// removed first; one still locked belongs to a distributed save that runs, and is refused.
    ///
    /// The folder is created under this process's own staging name, locked (shared: every rank
    /// takes [`lock_shared_staging`](Self::lock_shared_staging) while it writes), then renamed:
    /// a stale-staging cleaner beside it never sees it unlocked.
    pub fn begin_shared(target: &Path) -> Result<Self> {
        if target.exists() && !target.is_dir() {
            return Err(CheckpointError::NotADirectory(target.to_owned()));
        }
        let staging = Self::shared_staging(target);
        let parent = staging.parent().unwrap_or(Path::new(".")).to_owned();
        fs::create_dir_all(&parent).map_err(|e| CheckpointError::io(&parent, e))?;
        staging::remove_stale_staging(target)?;
        if staging.exists() {
            return Err(CheckpointError::io(
                &staging,
                std::io::Error::other(
                    "another distributed save into this folder is running (its staging folder is locked)",
                ),
            ));
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let own = tempfile::Builder::new()
            .prefix(&staging::staging_prefix(&name))
            .tempdir_in(&parent)
            .map_err(|e| CheckpointError::io(&parent, e))?
            .keep();
        let lock = match staging::lock_shared(&own).and_then(|l| {
            fs::rename(&own, &staging)
                .map(|()| l)
                .map_err(|e| CheckpointError::io(&staging, e))
        }) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_dir_all(&own);
                return Err(e);
            }
        };
        staging::register(&staging);
        Ok(DirTransaction {
            target: target.to_owned(),
            staging,
            done: false,
            durable: true,
            _lock: lock,
        })
    }

    /// The shared lock a rank of a distributed save holds on the staging folder of
    /// [`begin_shared`](Self::begin_shared) while it writes its shards, so that no
    /// stale-staging cleaner removes the folder under it. Released when the file drops.
    pub fn lock_shared_staging(target: &Path) -> Result<fs::File> {
        staging::lock_shared(&Self::shared_staging(target))
    }

    /// The staging folder of [`DirTransaction::begin_shared`] for `target`: beside it, named
    /// after it.
    pub fn shared_staging(target: &Path) -> PathBuf {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        parent.join(format!(".{name}.peftkit-staging-ranks"))
    }

    /// Whether folders are synced to disk around the swap (default). Without it the swap is
    /// still atomic for readers, but a power loss may lose the new content.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// The folder new files are written into.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The final folder.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the new folder into place. Entries of the old folder that are neither replaced
    /// by a new file nor selected by `drop_old` are carried over.
    pub fn commit(mut self, drop_old: impl Fn(&str) -> bool) -> Result<()> {
        // A signal handler waits for the swap to finish (see `abandon_staging`).
        let mut registry = staging::active();
        if self.target.is_dir() {
            copy_permissions(&self.target, &self.staging)?;
            carry_over(&self.target, &self.staging, &drop_old)?;
            if self.durable {
                sync_dir(&self.staging)?;
            }
            if exchange(&self.staging, &self.target)? {
                let old = self.staging.clone();
                registry.swapped(&self.staging, &old);
            } else {
                // No atomic exchange here: move the old folder aside, then the new one in.
                // Named like the staging folder, so a crash here leaves a folder the next
                // save recognises as stale.
                let mut aside = self.staging.clone().into_os_string();
                aside.push("-old");
                let aside = PathBuf::from(aside);
                fs::rename(&self.target, &aside)
                    .map_err(|e| CheckpointError::io(&self.target, e))?;
                if let Err(e) = fs::rename(&self.staging, &self.target) {
                    let _ = fs::rename(&aside, &self.target);
                    return Err(CheckpointError::io(&self.target, e));
                }
                registry.swapped(&self.staging, &aside);
                self.staging = aside;
            }
            // `self.staging` now names the old content; Drop removes it.
        } else {
            if self.durable {
                sync_dir(&self.staging)?;
            }
            fs::rename(&self.staging, &self.target)
                .map_err(|e| CheckpointError::io(&self.target, e))?;
            registry.forget(&self.staging);
            self.done = true;
        }
        drop(registry);
        if let Some(parent) = self.target.parent() {
            if self.durable {
                let _ = sync_dir(parent);
            }
        }
        Ok(())
    }
}

impl Drop for DirTransaction {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.staging);
        }
        staging::unregister(&self.staging);
    }
}

/// An error of a save into `target`, with a full disk or a file-size limit (ENOSPC, EDQUOT,
/// EFBIG) told as such: the staging folder is removed when the transaction drops, so the
/// target is as it was.
pub(crate) fn explain_abort(err: CheckpointError, target: &Path) -> CheckpointError {
    match err {
        CheckpointError::Io { path, source } if is_no_space(&source) => CheckpointError::NoSpace {
            path,
            target: target.to_owned(),
            source,
        },
        other => other,
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::FileTooLarge | ErrorKind::QuotaExceeded
    )
}

fn copy_permissions(from: &Path, to: &Path) -> Result<()> {
    let perms = fs::metadata(from)
        .map_err(|e| CheckpointError::io(from, e))?
        .permissions();
    fs::set_permissions(to, perms).map_err(|e| CheckpointError::io(to, e))
}

/// Links (or, across devices, copies) every entry of `old` that `new` does not have and
/// `drop_old` does not reject.
fn carry_over(old: &Path, new: &Path, drop_old: &dyn Fn(&str) -> bool) -> Result<()> {
    for entry in fs::read_dir(old).map_err(|e| CheckpointError::io(old, e))? {
        let entry = entry.map_err(|e| CheckpointError::io(old, e))?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        let dst = new.join(&name);
        if dst.symlink_metadata().is_ok() || drop_old(&name_str) {
            continue;
        }
        link_tree(&entry.path(), &dst)?;
    }
    Ok(())
}

fn link_tree(src: &Path, dst: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(src).map_err(|e| CheckpointError::io(src, e))?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(src).map_err(|e| CheckpointError::io(src, e))?;
        return symlink(&target, dst).map_err(|e| CheckpointError::io(dst, e));
    }
    if meta.is_dir() {
        fs::create_dir(dst).map_err(|e| CheckpointError::io(dst, e))?;
        fs::set_permissions(dst, meta.permissions()).map_err(|e| CheckpointError::io(dst, e))?;
        for entry in fs::read_dir(src).map_err(|e| CheckpointError::io(src, e))? {
            let entry = entry.map_err(|e| CheckpointError::io(src, e))?;
            link_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        return Ok(());
    }
    if fs::hard_link(src, dst).is_err() {
        fs::copy(src, dst).map_err(|e| CheckpointError::io(dst, e))?;
    }
    Ok(())
}

#[cfg(unix)]
fn symlink(target: &Path, dst: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, dst)
}

#[cfg(not(unix))]
fn symlink(target: &Path, dst: &Path) -> std::io::Result<()> {
    fs::copy(target, dst).map(|_| ())
}

/// Atomically swaps two folders. Returns `false` where the platform or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(true),
        Err(e)
            if e == rustix::io::Errno::INVAL
                || e == rustix::io::Errno::NOSYS
                || e == rustix::io::Errno::NOTSUP =>
        {
            Ok(false)
        }
        Err(e) => Err(CheckpointError::io(b, e.into())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f = fs::File::open(dir).map_err(|e| CheckpointError::io(dir, e))?;
        f.sync_all().map_err(|e| CheckpointError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A save beside a running distributed save must not take its shared staging folder for
    /// the litter of a dead run (its name carries no process id).
    #[test]
    fn a_running_distributed_staging_survives_a_stale_cleaner() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("ckpt");
        let tx = DirTransaction::begin_shared(&target).unwrap();
        let rank1 = DirTransaction::lock_shared_staging(&target).unwrap();
        assert!(crate::remove_stale_staging(&root.path().join("other"))
            .unwrap()
            .is_empty());
        assert!(tx.path().is_dir());
        assert!(
            DirTransaction::begin_shared(&target).is_err(),
            "a second save is refused"
        );
        drop(rank1);
        drop(tx);
        assert!(!DirTransaction::shared_staging(&target).exists());
    }

    #[test]
    fn commit_keeps_unrelated_files_and_drops_stale_ones() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("ckpt");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("tokenizer.json"), "tok").unwrap();
        fs::write(target.join("model.safetensors"), "old").unwrap();
        fs::write(target.join("stale-00001-of-00002.safetensors"), "old").unwrap();
        let tx = DirTransaction::begin(&target).unwrap();
        fs::write(tx.path().join("model.safetensors"), "new").unwrap();
        tx.commit(|name| name.starts_with("stale")).unwrap();
        assert_eq!(
            fs::read_to_string(target.join("model.safetensors")).unwrap(),
            "new"
        );
        assert_eq!(
            fs::read_to_string(target.join("tokenizer.json")).unwrap(),
            "tok"
        );
        assert!(!target.join("stale-00001-of-00002.safetensors").exists());
        let leftovers: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("ckpt")]);
    }

    #[test]
    fn abandoned_transaction_leaves_target_untouched() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("ckpt");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("model.safetensors"), "old").unwrap();
        {
            let tx = DirTransaction::begin(&target).unwrap();
            fs::write(tx.path().join("model.safetensors"), "half").unwrap();
        }
        assert_eq!(
            fs::read_to_string(target.join("model.safetensors")).unwrap(),
            "old"
        );
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn new_target_is_created() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("a/b");
        let tx = DirTransaction::begin(&target).unwrap();
        fs::write(tx.path().join("x"), "1").unwrap();
        tx.commit(|_| false).unwrap();
        assert_eq!(fs::read_to_string(target.join("x")).unwrap(), "1");
    }
}
