//! Keeping outputs apart from inputs.
//!
//! Every verb that writes a folder replaces it atomically; pointed at one of its own inputs, it
//! would swap that input for its output (a merge into its own base would replace the base, and
//! a second run would merge twice). So an output must not be an input, contain one, or lie
//! inside one. Paths are compared after resolving symlinks and `..`, so neither can hide an
//! overlap; an output that does not exist yet is resolved through its nearest existing
//! ancestor.

use std::path::{Component, Path, PathBuf};

use crate::error::{CheckpointError, Result};

/// How an output overlaps an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// The output is the input.
    Same,
    /// The output lies inside the input.
    Inside,
    /// The output contains the input.
    Contains,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Overlap::Same => "is",
            Overlap::Inside => "lies inside",
            Overlap::Contains => "contains",
        })
    }
}

/// Refuses an output folder `out` that is, lies inside or contains any of `inputs`.
///
/// ```
/// use peftkit_checkpoint::{ensure_apart, CheckpointError};
/// let dir = tempfile::tempdir().unwrap();
/// let base = dir.path().join("base");
/// std::fs::create_dir(&base).unwrap();
/// assert!(ensure_apart(&dir.path().join("merged"), &[&base]).is_ok());
/// let err = ensure_apart(&base.join("merged"), &[&base]).unwrap_err();
/// assert!(matches!(err, CheckpointError::OutputOverlapsInput { .. }));
/// ```
///
/// # Errors
/// [`CheckpointError::OutputOverlapsInput`] naming both paths, or an I/O error resolving them.
pub fn ensure_apart(out: &Path, inputs: &[&Path]) -> Result<()> {
    let out_real = resolve(out)?;
    for input in inputs {
        let in_real = resolve(input)?;
        let overlap = if out_real == in_real {
            Some(Overlap::Same)
        } else if out_real.starts_with(&in_real) {
            Some(Overlap::Inside)
        } else if in_real.starts_with(&out_real) {
            Some(Overlap::Contains)
        } else {
            None
        };
        if let Some(overlap) = overlap {
            return Err(CheckpointError::OutputOverlapsInput {
                out: out.to_path_buf(),
                input: input.to_path_buf(),
                overlap,
            });
        }
    }
    Ok(())
}

/// The output check of a verb with an `--in-place` mode: with `in_place = Some(input)`, `out`
/// must be that input itself (the save replaces it atomically) and apart from every other
/// input; with `None`, it must be apart from all of them ([`ensure_apart`]).
///
/// ```
/// use peftkit_checkpoint::ensure_output;
/// let dir = tempfile::tempdir().unwrap();
/// let base = dir.path().join("base");
/// std::fs::create_dir(&base).unwrap();
/// assert!(ensure_output(&base, &[&base], Some(&base)).is_ok());
/// assert!(ensure_output(&base, &[&base], None).is_err());
/// assert!(ensure_output(&dir.path().join("x"), &[&base], Some(&base)).is_err());
/// ```
///
/// # Errors
/// [`CheckpointError::NotInPlace`] or [`CheckpointError::OutputOverlapsInput`], or an I/O
/// error resolving the paths.
pub fn ensure_output(out: &Path, inputs: &[&Path], in_place: Option<&Path>) -> Result<()> {
    let Some(target) = in_place else {
        return ensure_apart(out, inputs);
    };
    if resolve(out)? != resolve(target)? {
        return Err(CheckpointError::NotInPlace {
            out: out.to_path_buf(),
            input: target.to_path_buf(),
        });
    }
    let target_real = resolve(target)?;
    let mut others = Vec::new();
    for i in inputs {
        if resolve(i)? != target_real {
            others.push(*i);
        }
    }
    ensure_apart(out, &others)
}

/// `path` with symlinks and `.`/`..` resolved; the part below its nearest existing ancestor is
/// appended as written (it cannot hold a symlink, since it does not exist).
fn resolve(path: &Path) -> Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(real) => return Ok(append(real, rest.iter().rev())),
            Err(_) => match (existing.parent(), existing.components().next_back()) {
                (Some(parent), Some(last)) => {
                    rest.push(last.as_os_str().to_owned());
                    existing = parent;
                }
                _ => return Ok(absolute),
            },
        }
    }
}

/// `base` joined with `names`, where a `..` removes the last component (below the nearest
/// existing ancestor nothing is a symlink, so `..` can be resolved by name).
fn append<'a>(mut base: PathBuf, names: impl Iterator<Item = &'a std::ffi::OsString>) -> PathBuf {
    for name in names {
        match Path::new(name).components().next() {
            Some(Component::ParentDir) => {
                base.pop();
            }
            Some(Component::CurDir) | None => {}
            _ => base.push(name),
        }
    }
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir(&base).unwrap();
        (dir, base)
    }

    fn overlap(out: &Path, input: &Path) -> Option<Overlap> {
        match ensure_apart(out, &[input]) {
            Ok(()) => None,
            Err(CheckpointError::OutputOverlapsInput { overlap, .. }) => Some(overlap),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn same_inside_and_containing_outputs_are_refused() {
        let (dir, base) = setup();
        assert_eq!(overlap(&base, &base), Some(Overlap::Same));
        assert_eq!(overlap(&base.join("x/y"), &base), Some(Overlap::Inside));
        assert_eq!(overlap(dir.path(), &base), Some(Overlap::Contains));
        assert_eq!(overlap(&dir.path().join("out"), &base), None);
        assert_eq!(overlap(&dir.path().join("base2"), &base), None);
    }

    #[test]
    fn dot_dot_and_symlinks_do_not_hide_an_overlap() {
        let (dir, base) = setup();
        let sneaky = dir.path().join("base/../base");
        assert_eq!(overlap(&sneaky, &base), Some(Overlap::Same));
        let through_new = dir.path().join("new/../base");
        assert_eq!(overlap(&through_new, &base), Some(Overlap::Same));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        assert_eq!(overlap(&link, &base), Some(Overlap::Same));
        assert_eq!(overlap(&link.join("new"), &base), Some(Overlap::Inside));
        assert_eq!(overlap(&base, &link), Some(Overlap::Same));
    }

    #[test]
    fn a_relative_output_is_resolved_from_the_working_folder() {
        let (_dir, base) = setup();
        let cwd = std::env::current_dir().unwrap();
        let rel = pathdiff(&base, &cwd);
        assert_eq!(overlap(&rel, &base), Some(Overlap::Same));
    }

    /// `target` relative to `from` (both absolute), with `..` as needed.
    fn pathdiff(target: &Path, from: &Path) -> PathBuf {
        let (t, f): (Vec<_>, Vec<_>) = (target.components().collect(), from.components().collect());
        let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
        let mut rel = PathBuf::new();
        for _ in common..f.len() {
            rel.push("..");
        }
        for c in &t[common..] {
            rel.push(c);
        }
        rel
    }
}
