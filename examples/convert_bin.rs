//! Convert a `.bin` checkpoint (`torch.save` pickle weights) to safetensors without running
//! the pickle: the files `from_pretrained(IN).save_pretrained(OUT)` would write.
//!
//! ```text
//! cargo run --example convert_bin -- path/to/pytorch_model_folder out_folder [bf16|f16|f32]
//! ```
//!
//! Without arguments it converts the sharded `.bin` fixture of `tests/fixtures/hub` into a
//! temporary folder, which is what CI runs.

use std::path::{Path, PathBuf};

use peftkit::checkpoint::parse_cast_dtype;
use peftkit::{Checkpoint, ReshardOptions};

fn run(input: &Path, out: &Path, dtype: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
    // Opening reads only the pickle: tensors stay in the file until they are written.
    let source = Checkpoint::open(input)?;
    println!(
        "{}: {} tensors in {} .bin file(s)",
        input.display(),
        source.len(),
        source.files.len()
    );
    let options = ReshardOptions {
        dtype: dtype
            .map(|d| parse_cast_dtype(d).ok_or("use bf16, f16 or f32"))
            .transpose()?,
        ..Default::default()
    };
    let report = peftkit::convert(input, out, &options)?;
    println!(
        "{}: {:?}, {} bytes, {} tied tensor(s) written once",
        out.display(),
        report.save.weight_files,
        report.save.total_size,
        report.save.dropped_ties.len()
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [input, out, rest @ ..] => run(
            Path::new(input),
            Path::new(out),
            rest.first().map(String::as_str),
        ),
        _ => {
            let tmp = tempfile::tempdir()?;
            run(&fixture(), &tmp.path().join("converted"), None)
        }
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub/llama_sharded/source")
}

#[cfg(test)]
mod tests {
    /// `cargo test` runs the example (`test = true` in Cargo.toml) on the fixture.
    #[test]
    fn converts_the_fixture() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        super::run(&super::fixture(), &out, Some("bf16")).unwrap();
        assert_eq!(peftkit::Checkpoint::open(&out).unwrap().len(), 12);
    }
}
