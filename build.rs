//! Puts the git commit into `peftkit --version` (`PEFTKIT_VERSION`): `0.1.0 (commit
//! 1a2b3c4d5e6f)` in a git checkout, `0.1.0 (commit …)` from `$PEFTKIT_GIT_COMMIT` when a
//! packager sets it, and the bare version from a tarball without `.git` or without git.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=PEFTKIT_GIT_COMMIT");
    let version = env!("CARGO_PKG_VERSION");
    // Only a repository of our own: a tarball unpacked inside another repository must not
    // report that repository's commit.
    let ours = git(&["rev-parse", "--show-toplevel"])
        .is_some_and(|top| Path::new(&top) == Path::new(env!("CARGO_MANIFEST_DIR")));
    let commit = std::env::var("PEFTKIT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            ours.then(|| git(&["rev-parse", "--short=12", "HEAD"]))
                .flatten()
        });
    if ours {
        // Rebuild when HEAD moves: HEAD itself (a branch switch) and the branch's ref.
        for path in [
            git(&["rev-parse", "--git-path", "HEAD"]),
            git(&["symbolic-ref", "-q", "HEAD"])
                .and_then(|r| git(&["rev-parse", "--git-path", &r])),
            git(&["rev-parse", "--git-path", "packed-refs"]),
        ]
        .into_iter()
        .flatten()
        {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    match commit {
        Some(c) => println!("cargo:rustc-env=PEFTKIT_VERSION={version} (commit {c})"),
        None => println!("cargo:rustc-env=PEFTKIT_VERSION={version}"),
    }
}
