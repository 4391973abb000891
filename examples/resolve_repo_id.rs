//! Resolve a repo id (`org/name[@revision]`) from the local Hugging Face cache, offline, and
//! open the checkpoint it names.
//!
//! ```text
//! cargo run --example resolve_repo_id -- meta-llama/Llama-3.2-1B
//! ```
//!
//! The cache is found as huggingface_hub finds it (`HF_HUB_CACHE`, `HF_HOME/hub`,
//! `~/.cache/huggingface/hub`). Without an argument, the example resolves a repo of the small
//! cache in `tests/fixtures/hub/cache` (written by huggingface_hub), which is what CI runs.

use peftkit::{Checkpoint, HubCache, RepoSpec};

fn run(repo_id: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
    let (spec, cache) = match repo_id {
        Some(id) => (id, HubCache::from_env()),
        None => (
            "peftkit-test/tiny-llama@v1.0",
            HubCache::at(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/hub/cache"
            )),
        ),
    };
    let spec = RepoSpec::parse(spec).ok_or("expected org/name[@revision]")?;
    // An uncached repo is an error naming the cache and the `hf download` command.
    let dir = cache.resolve(&spec)?;
    let ckpt = Checkpoint::open(&dir)?;
    println!(
        "{spec} -> {}: {} tensors, {} bytes in {} file(s)",
        dir.display(),
        ckpt.len(),
        ckpt.total_bytes(),
        ckpt.files.len()
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run(std::env::args().nth(1).as_deref())
}

#[cfg(test)]
mod tests {
    /// `cargo test` runs the example (`test = true` in Cargo.toml) on the fixture cache.
    #[test]
    fn runs_on_the_fixture_cache() {
        super::run(None).unwrap();
    }
}
