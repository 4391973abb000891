//! Repo ids resolved from a Hugging Face cache written by huggingface_hub's own cache code
//! (tests/fixtures/hub/cache, fixturegen/hub_cases.py): every spec resolves to the snapshot
//! `snapshot_download(..., local_files_only=True)` returned, or fails where it failed.

mod common;

use common::{fixture_root, read_json};
use peftkit_checkpoint::{resolve_model_path, Checkpoint, CheckpointError, HubCache, RepoSpec};

#[test]
fn specs_resolve_as_huggingface_hub_resolves_them() {
    let root = fixture_root("hub");
    let cache = HubCache::at(root.join("cache"));
    let cases = read_json(&root.join("cache.json"));
    let cases = cases["snapshots"].as_object().unwrap();
    assert!(cases.values().any(|v| v.is_null()) && cases.values().any(|v| !v.is_null()));
    for (spec, expected) in cases {
        let parsed = RepoSpec::parse(spec).unwrap_or_else(|| panic!("{spec} does not parse"));
        match (cache.resolve(&parsed), expected.as_str()) {
            (Ok(path), Some(rel)) => assert_eq!(path, root.join("cache").join(rel), "{spec}"),
            (Err(e), None) => {
                assert!(
                    matches!(e, CheckpointError::NotInHubCache { .. }),
                    "{spec}: {e}"
                );
                let text = e.to_string();
                assert!(text.contains(&cache.root().display().to_string()), "{text}");
                assert!(text.contains(&parsed.download_command()), "{text}");
            }
            (got, want) => panic!("{spec}: got {got:?}, huggingface_hub gave {want:?}"),
        }
    }
}

/// A snapshot's files are links into `blobs/`: a sharded checkpoint opens and verifies there,
/// though its index names files that lead out of the snapshot folder.
#[test]
fn snapshots_open_through_their_links() {
    let cache = HubCache::at(fixture_root("hub").join("cache"));
    let dir = cache
        .resolve(&RepoSpec::parse("peftkit-test/tiny-llama@v1.0").unwrap())
        .unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.files.len(), 6);
    let problems = peftkit_checkpoint::verify(&dir, Default::default(), None).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn repo_spec_syntax() {
    for bad in [
        "a",
        "a/b/c",
        "./a/b",
        "/abs/path",
        "a/b@",
        "a/b@../x",
        "a--b/c",
        "a/.b",
        "a/b@/x",
    ] {
        assert_eq!(RepoSpec::parse(bad), None, "{bad}");
    }
    let s = RepoSpec::parse("org/name@refs/pr/1").unwrap();
    assert_eq!(s.revision.as_deref(), Some("refs/pr/1"));
    assert_eq!(
        s.download_command(),
        "hf download org/name --revision refs/pr/1"
    );
}

/// The environment picks the cache as huggingface_hub does (one test: it sets variables).
#[test]
fn the_cache_comes_from_the_environment() {
    let root = fixture_root("hub").join("cache");
    let vars = [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "HOME",
    ];
    let saved: Vec<_> = vars.iter().map(std::env::var_os).collect();
    for v in vars {
        std::env::remove_var(v);
    }
    std::env::set_var("HOME", "/home/someone");
    assert_eq!(
        HubCache::from_env().root(),
        std::path::Path::new("/home/someone/.cache/huggingface/hub")
    );
    std::env::set_var("XDG_CACHE_HOME", "/xdg");
    assert_eq!(
        HubCache::from_env().root(),
        std::path::Path::new("/xdg/huggingface/hub")
    );
    std::env::set_var("HF_HOME", "/hfhome");
    assert_eq!(
        HubCache::from_env().root(),
        std::path::Path::new("/hfhome/hub")
    );
    std::env::set_var("HF_HUB_CACHE", &root);
    assert_eq!(HubCache::from_env().root(), root);
    let path = resolve_model_path("peftkit-test/tiny-llama").unwrap();
    assert!(
        path.ends_with("snapshots/7fa86e9757fa1cc64fe1b2f8613dcbe8d3f88fff"),
        "{path:?}"
    );
    // A local folder of that name would win; a plain missing path stays a path.
    assert_eq!(
        resolve_model_path("no/such/dir").unwrap(),
        std::path::Path::new("no/such/dir")
    );
    for (v, old) in vars.iter().zip(saved) {
        match old {
            Some(o) => std::env::set_var(v, o),
            None => std::env::remove_var(v),
        }
    }
}
