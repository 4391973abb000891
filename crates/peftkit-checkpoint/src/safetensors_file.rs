//! One safetensors file: reading its header without its data, validating it, and writing a
//! file byte for byte as the `safetensors` Python package writes it.
//!
//! The layout (8-byte little-endian header length, compact JSON header padded with spaces to
//! a multiple of 8, then the raw data) and the order (dtype by descending alignment, then
//! name) come from the safetensors Rust core, which Python's `save_file` calls. Writing the
//! header ourselves instead of calling `serialize_to_file` keeps the data pull lazy and lets
//! the output go to any sink (a staging folder, a progress counter).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::error::{CheckpointError, Result};
use crate::tensor::{byte_len, dtype_name, parse_dtype, Dtype, SourceFile, Tensor};

/// The largest header the safetensors core accepts.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorHeader {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub data_offsets: (u64, u64),
}

/// A parsed and validated safetensors header.
#[derive(Debug, Clone)]
pub struct SafetensorsHeader {
    /// `__metadata__`, if present (string to string).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tensors in data order (ascending offsets).
    pub tensors: Vec<TensorHeader>,
    /// Absolute offset of the data section (8 + header length).
    pub data_start: u64,
}

/// One problem found in a file. `verify` lists them all; readers stop at the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    /// The tensor concerned, if the problem is about one.
    pub tensor: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl FileProblem {
    fn header(reason: impl Into<String>) -> Self {
        FileProblem {
            tensor: None,
            reason: reason.into(),
        }
    }
    fn tensor(name: &str, reason: impl Into<String>) -> Self {
        FileProblem {
            tensor: Some(name.to_owned()),
            reason: reason.into(),
        }
    }
    /// Turns the problem into an error naming `path`.
    pub fn into_error(self, path: &Path) -> CheckpointError {
        match self.tensor {
            Some(tensor) => CheckpointError::InvalidTensor {
                path: path.to_owned(),
                tensor,
                reason: self.reason,
            },
            None => CheckpointError::InvalidHeader {
                path: path.to_owned(),
                reason: self.reason,
            },
        }
    }
}

/// Reads the header of `path` (not its data) and returns it with every problem found.
/// The header is `None` when it could not be parsed at all.
pub fn inspect_file(path: &Path) -> Result<(Option<SafetensorsHeader>, Vec<FileProblem>)> {
    let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| CheckpointError::io(path, e))?
        .len();
    let mut prefix = [0u8; 8];
    if file_len < 8 {
        return Ok((
            None,
            vec![FileProblem::header(format!(
                "file is {file_len} bytes, shorter than the 8-byte header length"
            ))],
        ));
    }
    file.read_exact(&mut prefix)
        .map_err(|e| CheckpointError::io(path, e))?;
    let n = u64::from_le_bytes(prefix);
    let problem = if n > MAX_HEADER_SIZE {
        Some(format!(
            "header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit"
        ))
    } else if 8 + n > file_len {
        Some(format!(
            "header length {n} runs past the end of the {file_len}-byte file"
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Ok((
            None,
            vec![FileProblem::header(not_safetensors(&prefix, problem))],
        ));
    }
    let mut raw = vec![0u8; n as usize];
    file.read_exact(&mut raw)
        .map_err(|e| CheckpointError::io(path, e))?;
    Ok(parse_header(&raw, 8 + n, file_len - 8 - n))
}

/// `problem`, or, when the first bytes are text (a safetensors file starts with a binary
/// length), a plainer explanation: the file is JSON or text, not safetensors.
fn not_safetensors(prefix: &[u8; 8], problem: String) -> String {
    let text = prefix
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    match (text, prefix.first()) {
        (true, Some(b'{' | b'[')) => format!("this is a JSON file, not a safetensors file ({problem}); give the checkpoint's folder or its .safetensors file"),
        (true, _) => format!("this is a text file, not a safetensors file ({problem}); give the checkpoint's folder or its .safetensors file"),
        _ => problem,
    }
}

/// Reads and validates the header of `path`, failing on the first problem.
pub fn read_header(path: &Path) -> Result<SafetensorsHeader> {
    let (header, problems) = inspect_file(path)?;
    if let Some(p) = problems.into_iter().next() {
        return Err(p.into_error(path));
    }
    header.ok_or_else(|| CheckpointError::InvalidHeader {
        path: path.to_owned(),
        reason: "unreadable".into(),
    })
}

fn parse_header(
    raw: &[u8],
    data_start: u64,
    data_len: u64,
) -> (Option<SafetensorsHeader>, Vec<FileProblem>) {
    let mut problems = Vec::new();
    let root: serde_json::Map<String, Value> = match serde_json::from_slice(raw) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return (
                None,
                vec![FileProblem::header("header is not a JSON object")],
            )
        }
        Err(e) => {
            return (
                None,
                vec![FileProblem::header(format!(
                    "header is not valid JSON: {e}"
                ))],
            )
        }
    };
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(root.len());
    for (name, entry) in &root {
        if name == "__metadata__" {
            match entry.as_object().map(|m| {
                m.iter()
                    .map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                    .collect::<Option<BTreeMap<_, _>>>()
            }) {
                Some(Some(m)) => metadata = Some(m),
                _ => problems.push(FileProblem::header(
                    "__metadata__ must map strings to strings",
                )),
            }
            continue;
        }
        match parse_tensor_entry(name, entry) {
            Ok(t) => tensors.push(t),
            Err(p) => problems.push(p),
        }
    }
    tensors.sort_by_key(|t| (t.data_offsets.0, t.data_offsets.1));
    let mut expected_start = 0u64;
    for t in &tensors {
        let (begin, end) = t.data_offsets;
        if end < begin {
            problems.push(FileProblem::tensor(
                &t.name,
                format!("data_offsets [{begin}, {end}] end before they begin"),
            ));
            continue;
        }
        if begin != expected_start {
            let what = if begin > expected_start {
                "leaves a gap"
            } else {
                "overlaps the previous tensor"
            };
            problems.push(FileProblem::tensor(
                &t.name,
                format!("data_offsets start at {begin} but the previous tensor ends at {expected_start}: {what}"),
            ));
        }
        match byte_len(t.dtype, &t.shape) {
            Some(len) if len as u64 == end - begin => {}
            Some(len) => problems.push(FileProblem::tensor(
                &t.name,
                format!(
                    "{} {:?} needs {len} bytes but data_offsets [{begin}, {end}] span {}",
                    dtype_name(t.dtype),
                    t.shape,
                    end - begin
                ),
            )),
            None => problems.push(FileProblem::tensor(
                &t.name,
                format!("shape {:?} overflows or is not byte aligned", t.shape),
            )),
        }
        expected_start = expected_start.max(end);
    }
    if expected_start != data_len {
        problems.push(FileProblem::header(format!(
            "the tensors cover {expected_start} bytes of data but the file holds {data_len} after the header{}",
            if expected_start < data_len { " (trailing bytes)" } else { " (truncated file)" }
        )));
    }
    (
        Some(SafetensorsHeader {
            metadata,
            tensors,
            data_start,
        }),
        problems,
    )
}

fn parse_tensor_entry(name: &str, entry: &Value) -> std::result::Result<TensorHeader, FileProblem> {
    let obj = entry
        .as_object()
        .ok_or_else(|| FileProblem::tensor(name, "entry is not an object"))?;
    let dtype_str = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| FileProblem::tensor(name, "missing dtype"))?;
    let dtype = parse_dtype(dtype_str)
        .ok_or_else(|| FileProblem::tensor(name, format!("unknown dtype `{dtype_str}`")))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            FileProblem::tensor(name, "shape must be a list of non-negative integers")
        })?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|a| match a.as_slice() {
            [b, e] => Some((b.as_u64()?, e.as_u64()?)),
            _ => None,
        })
        .ok_or_else(|| {
            FileProblem::tensor(name, "data_offsets must be two non-negative integers")
        })?;
    Ok(TensorHeader {
        name: name.to_owned(),
        dtype,
        shape,
        data_offsets: offsets,
    })
}

/// Opens a safetensors file and returns its header and tensor handles, in data order.
/// Only the header is read; each tensor's bytes are read when they are asked for.
pub fn open_file(path: &Path) -> Result<(SafetensorsHeader, Vec<(String, Tensor)>)> {
    let header = read_header(path)?;
    let source = SourceFile::open(path)?;
    let tensors = header
        .tensors
        .iter()
        .map(|t| {
            let tensor = Tensor::from_file(
                t.dtype,
                t.shape.clone(),
                Arc::clone(&source),
                header.data_start + t.data_offsets.0,
            )
            .map_err(|e| CheckpointError::InvalidTensor {
                path: path.to_owned(),
                tensor: t.name.clone(),
                reason: e.to_string(),
            })?;
            Ok((t.name.clone(), tensor))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((header, tensors))
}

/// The header bytes (length prefix included) for `tensors`, already in file order.
fn header_bytes(
    metadata: &BTreeMap<String, String>,
    ordered: &[(&str, &Tensor)],
) -> Result<Vec<u8>> {
    // Built by hand in exactly serde_json's compact form, which is what the safetensors core
    // emits: `__metadata__` first, then each tensor as {"dtype","shape","data_offsets"}.
    let mut json = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).map_err(|e| {
            CheckpointError::TensorData {
                tensor: String::new(),
                reason: format!("metadata cannot be encoded: {e}"),
            }
        })?);
        first = false;
    }
    let mut offset = 0u64;
    for (name, t) in ordered {
        if !first {
            json.push(',');
        }
        first = false;
        let end = offset + t.byte_len() as u64;
        let quoted = serde_json::to_string(name).map_err(|e| CheckpointError::TensorData {
            tensor: (*name).to_owned(),
            reason: format!("name cannot be encoded: {e}"),
        })?;
        let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            "{quoted}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            dtype_name(t.dtype()),
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    let padded = json.len().next_multiple_of(8);
    let mut out = Vec::with_capacity(8 + padded);
    out.extend_from_slice(&(padded as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(8 + padded, b' ');
    Ok(out)
}

/// The order the safetensors core writes tensors in: dtype by descending alignment, then
/// name by bytes.
pub fn file_order<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Vec<(&'a str, &'a Tensor)> {
    let mut v: Vec<_> = tensors.into_iter().collect();
    v.sort_by(|(ln, lt), (rn, rt)| rt.dtype().cmp(&lt.dtype()).then(ln.cmp(rn)));
    v
}

/// Writes `tensors` to `path` as one safetensors file with `metadata`, pulling each tensor's
/// bytes once, and syncs it to disk. `on_bytes` is told how many data bytes were written after
/// each tensor (for progress bars). Returns the file's size.
pub fn write_file<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    metadata: &BTreeMap<String, String>,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<u64> {
    let job = FileJob {
        path: path.to_owned(),
        tensors: tensors.into_iter().collect(),
        direct: true,
    };
    let mut done = None;
    write_files(vec![job], metadata, on_bytes, &mut |_, size, file| {
        done = Some((size, file))
    })?;
    let (size, file) = done.ok_or_else(|| {
        CheckpointError::io(path, std::io::Error::other("the file was not written"))
    })?;
    file.sync_all().map_err(|e| CheckpointError::io(path, e))?;
    Ok(size)
}

/// One safetensors file to write: its path and its tensors (in any order).
pub(crate) struct FileJob<'a> {
    pub(crate) path: std::path::PathBuf,
    pub(crate) tensors: Vec<(&'a str, &'a Tensor)>,
    /// Whether the caller syncs the file: its computed tensors are then written around the
    /// page cache where the file system allows ([`crate::direct`]).
    pub(crate) direct: bool,
}

/// A file being written: its open handle, final size, and tensors with their offsets.
struct Prepared<'a> {
    path: std::path::PathBuf,
    file: File,
    /// The `O_DIRECT` handle, for a synced file on a file system that has it.
    direct: Option<File>,
    /// Whether edited tensors are edited where they lie in the file (buffered output on a
    /// file system where that is safe; see [`crate::in_file::edits_in_file`]).
    edit_in_file: bool,
    /// Whether untouched ranges may be copied through our own pipe ([`crate::kernel_copy`]).
    splices: bool,
    size: u64,
    /// `(name, tensor, offset)` in file order.
    items: Vec<(&'a str, &'a Tensor, u64)>,
    /// Held by each write through the page cache (see [`Prepared::buffered`]).
    writing: Mutex<()>,
    /// Whether the caller syncs the file: bytes copied through the page cache are then sent
    /// to the disk at once ([`start_writeback`]).
    synced: bool,
    /// Whether this synced save's tensors computed block by block go through the page cache
    /// (its output fits in free memory: [`crate::direct::blocks_in_cache`]).
    blocks_in_cache: bool,
}

impl Prepared<'_> {
    /// Runs `write`, a write through the page cache, while no other worker writes this file
    /// that way. ext4 (like most file systems) serialises buffered writes to a file on its
    /// inode lock, and a writer waiting there spins on the CPU while the holder copies (the
    /// kernel's optimistic spinning: a core burnt for every contended copy of an untouched
    /// tensor). Waiting here sleeps instead.
    fn buffered<T>(&self, write: impl FnOnce() -> T) -> T {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        write()
    }

    /// For a synced file, starts writing the `len` bytes at `offset`, just copied into the page
    /// cache, to the disk without waiting: the disk then works while the rest of the file is
    /// copied, instead of all of it at the file's sync (a single-file `extract` or `convert`
    /// otherwise copies first and writes after).
    fn start_writeback(&self, offset: u64, len: u64) {
        if self.synced {
            start_writeback(&self.file, offset, len);
        }
    }
}

/// Starts writing the `len` bytes at `offset` of `file`, just written through the page cache,
/// to the disk without waiting (a synced save's copied tensors, and its merged tensors written
/// in blocks: [`crate::OutputRegion::in_blocks`]). `POSIX_FADV_DONTNEED` starts writeback of
/// the dirty range; it drops only pages already clean. Advice, so a failure changes nothing.
/// `PEFTKIT_NO_EARLY_WRITEBACK` (a switch for benchmarks) leaves it all to the file's sync.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    if std::env::var_os("PEFTKIT_NO_EARLY_WRITEBACK").is_none() {
        let len = std::num::NonZeroU64::new(len);
        let _ = rustix::fs::fadvise(file, offset, len, rustix::fs::Advice::DontNeed);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// How many tensors a save writes (and computes) at once: 2 to 4 workers, as the cores allow.
/// Each may hold a computed tensor in memory, so the count bounds a save's memory as well as
/// its parallelism; work that computes tensors ahead of a save should run as many at a time.
pub fn save_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4)
}

/// Writes several safetensors files with one pool of workers, unsynced.
///
/// Every header is written first; it fixes every tensor's offset, so tensors need not be
/// written in order: a few workers (one per core, 2–4) each take the next tensor of a global
/// work list (files in groups of one per worker, round-robin inside a group, each file in file
/// order), read or compute its bytes and write them at their offset. Reading, computing (a merge) and copying into the page cache of different tensors,
/// and of different files, then overlap on all cores instead of queueing behind one writer. At
/// most one tensor per worker is in memory; untouched file-backed tensors are copied inside the
/// kernel.
///
/// `on_bytes` is told the size of each tensor written; `on_file(index, size, file)` is called
/// as soon as all tensors of file `index` are written (a save starts syncing it while the
/// other files are written). Both run on the calling thread. On error, the failing tensor that
/// comes first in the work list is reported (whatever the thread timing) and the files are left
/// for the caller to discard.
pub(crate) fn write_files(
    jobs: Vec<FileJob<'_>>,
    metadata: &BTreeMap<String, String>,
    on_bytes: &mut dyn FnMut(u64),
    on_file: &mut dyn FnMut(usize, u64, File),
) -> Result<()> {
    let prepared = prepare_files(jobs, metadata)?;
    let workers = save_workers().min(prepared.iter().map(|p| p.items.len()).sum::<usize>().max(1));
    let work = work_list(&prepared, workers);
    let left: Vec<AtomicUsize> = prepared
        .iter()
        .map(|p| AtomicUsize::new(p.items.len()))
        .collect();
    enum Msg {
        Wrote(u64),
        FileDone(usize),
        Failed((usize, usize), CheckpointError),
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let mut errors: Vec<((usize, usize), CheckpointError)> = Vec::new();
    let mut finished = vec![false; prepared.len()];
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (prepared, work, left) = (&prepared, &work, &left);
            let (next, failed) = (&next, &failed);
            scope.spawn(move || loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let w = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = work.get(w) else {
                    return;
                };
                let p = &prepared[job.file];
                let items = std::iter::once(job.item).chain(job.followers.iter().copied());
                for (k, i) in items.enumerate() {
                    let (name, t, offset) = p.items[i];
                    let msg = match write_tensor_at(p, t, offset) {
                        Ok(n) => Msg::Wrote(n),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            Msg::Failed((w, k), with_tensor_name(e, name))
                        }
                    };
                    let ok = matches!(msg, Msg::Wrote(_));
                    if tx.send(msg).is_err() || !ok {
                        return;
                    }
                    if left[job.file].fetch_sub(1, Ordering::AcqRel) == 1
                        && tx.send(Msg::FileDone(job.file)).is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for msg in rx {
            match msg {
                Msg::Wrote(n) => on_bytes(n),
                Msg::Failed(w, e) => errors.push((w, e)),
                Msg::FileDone(f) => finished[f] = true,
            }
            // Hand finished files over at once, in any order, unless something failed.
            if errors.is_empty() {
                for (f, done) in finished.iter_mut().enumerate() {
                    if *done {
                        *done = false;
                        let p = &prepared[f];
                        if let Ok(file) = p.file.try_clone() {
                            on_file(f, p.size, file);
                        } else {
                            // Without a second handle, hand the file over after the workers.
                            *done = true;
                        }
                    }
                }
            }
        }
    });
    // Report the failure that comes first in the work list (a work item, then its followers in
    // order): every tensor before it was taken before it and has finished, so the choice does
    // not depend on thread timing.
    if let Some((_, e)) = errors.into_iter().min_by_key(|(w, _)| *w) {
        return Err(e);
    }
    for (f, p) in prepared.into_iter().enumerate() {
        if p.items.is_empty() || finished[f] {
            on_file(f, p.size, p.file);
        }
    }
    Ok(())
}

/// Creates every file of `jobs` with its header written, and places each tensor at its offset
/// (in file order).
fn prepare_files<'a>(
    jobs: Vec<FileJob<'a>>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<Prepared<'a>>> {
    let mut prepared = Vec::with_capacity(jobs.len());
    for job in jobs {
        let ordered = file_order(job.tensors);
        for w in ordered.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(CheckpointError::DuplicateTensor(w[0].0.to_owned()));
            }
        }
        let header = header_bytes(metadata, &ordered)?;
        let path = job.path;
        // Readable too: edits in the file map it (`InPlaceEdit::apply_in_file`).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| CheckpointError::io(&path, e))?;
        write_all_at(&file, &header, 0).map_err(|e| CheckpointError::io(&path, e))?;
        let mut size = header.len() as u64;
        let mut items = Vec::with_capacity(ordered.len());
        for (name, t) in ordered {
            items.push((name, t, size));
            size += t.byte_len() as u64;
        }
        // Direct writes must not extend the file (ext4 serialises those and updates the size
        // synchronously): it gets its final length first.
        let direct = match job.direct {
            true => {
                file.set_len(size)
                    .map_err(|e| CheckpointError::io(&path, e))?;
                crate::direct::open(&path)
            }
            false => None,
        };
        let synced = job.direct;
        let edit_in_file = direct.is_none() && crate::in_file::edits_in_file(&file);
        let splices = crate::kernel_copy::splices(&file);
        prepared.push(Prepared {
            path,
            file,
            direct,
            edit_in_file,
            splices,
            size,
            items,
            writing: Mutex::new(()),
            synced,
            blocks_in_cache: false,
        });
    }
    let bytes = prepared.iter().map(|p| p.size).sum();
    if prepared.iter().any(|p| p.direct.is_some()) && crate::direct::blocks_in_cache(bytes) {
        prepared.iter_mut().for_each(|p| p.blocks_in_cache = true);
    }
    Ok(prepared)
}

/// The global work list of [`write_files`]: `(file index, item index)`, each with the items
/// its worker writes right after it ([`Tensor::written_after`]).
///
/// Files are taken in groups of `workers`, round-robin inside a group, so that workers mostly
/// write different files: two writes to one file serialise on its inode lock (and spin on it).
/// Groups keep early files finishing early, so their syncs overlap the writing of later ones.
/// Inside a file, tensors go in file order, those that asked for it last
/// ([`Tensor::written_last`]) at the end, unless they follow a tensor of the file.
fn work_list(prepared: &[Prepared<'_>], workers: usize) -> Vec<Work> {
    let order: Vec<Vec<Work>> = prepared.iter().enumerate().map(file_work).collect();
    let mut order: Vec<std::vec::IntoIter<Work>> = order.into_iter().map(Vec::into_iter).collect();
    let mut work = Vec::new();
    for group in (0..prepared.len()).collect::<Vec<_>>().chunks(workers) {
        let longest = group.iter().map(|&f| order[f].len()).max().unwrap_or(0);
        for _ in 0..longest {
            for &f in group {
                work.extend(order[f].next());
            }
        }
    }
    work
}

/// One item of the work list, and the items of its file written right after it.
#[derive(Debug)]
struct Work {
    file: usize,
    item: usize,
    followers: Vec<usize>,
}

/// The work of file `f` (see [`work_list`]).
fn file_work((f, p): (usize, &Prepared<'_>)) -> Vec<Work> {
    let last = |i: &usize| p.items[*i].1.is_written_last();
    let (late, early): (Vec<usize>, Vec<usize>) = (0..p.items.len()).partition(last);
    let mut work: Vec<Work> = early
        .iter()
        .map(|&item| Work {
            file: f,
            item,
            followers: vec![],
        })
        .collect();
    let at: HashMap<&str, usize> = early
        .iter()
        .enumerate()
        .map(|(w, &i)| (p.items[i].0, w))
        .collect();
    let mut tail = Vec::new();
    for i in late {
        match p.items[i].1.follows().and_then(|name| at.get(name)) {
            Some(&w) => work[w].followers.push(i),
            None => tail.push(Work {
                file: f,
                item: i,
                followers: vec![],
            }),
        }
    }
    work.extend(tail);
    work
}

/// Writes one tensor's bytes at `offset` of `p`'s file; returns how many. Untouched file-backed
/// bytes are copied in the kernel; computed ones are written directly when the file has a
/// direct handle, else through the page cache.
fn write_tensor_at(p: &Prepared<'_>, t: &Tensor, offset: u64) -> Result<u64> {
    let (file, path) = (&p.file, &p.path);
    if let Some(parts) = t.parts() {
        return write_parts_at(p, parts, offset);
    }
    if let Some(n) = copy_in_kernel(p, t, offset)? {
        return Ok(n);
    }
    let len = t.byte_len();
    if let Some(streamed) = t.streamed_computation() {
        // It writes itself, piece by piece (around the page cache when the file is synced).
        if streamed.write_in_file(&region(p, offset, len))? {
            return Ok(len as u64);
        }
    }
    if let Some((src, src_offset, edit)) = t.edited_file_region() {
        // The edit writes the file itself, reading the source as it goes.
        let source = crate::SourceRegion::new(src, src_offset);
        if edit.apply_in_file(source, &region(p, offset, len))? {
            return Ok(len as u64);
        }
    }
    if let (Some(direct), Some((src, src_offset, edit))) = (&p.direct, t.edited_file_region()) {
        // Read where the bytes can go to the disk from (see `direct::same_phase`), edit, write.
        let (mut buf, range) = crate::direct::same_phase(len, offset);
        src.read_exact_at(&mut buf[range.clone()], src_offset)?;
        edit.apply(&mut buf[range.clone()])?;
        crate::direct::write_all_at(file, direct, &buf[range], offset)
            .map_err(|e| CheckpointError::io(path, e))?;
        crate::tensor::buffers::give(buf);
        return Ok(len as u64);
    }
    t.for_each_chunk(&mut |at, chunk| write_chunk_at(p, chunk, offset + at))
}

/// The `len` bytes at `offset` of `p`'s file, for a tensor that writes itself there.
fn region<'a>(p: &'a Prepared<'_>, offset: u64, len: usize) -> crate::OutputRegion<'a> {
    crate::OutputRegion {
        file: &p.file,
        path: &p.path,
        offset,
        len,
        mappable: p.edit_in_file,
        writing: &p.writing,
        direct: p.direct.as_ref(),
        synced: p.synced,
        blocks_in_cache: p.blocks_in_cache,
    }
}

/// Writes computed or read bytes at `offset` of `p`'s file: directly when the file has a
/// direct handle, else through the page cache.
fn write_chunk_at(p: &Prepared<'_>, chunk: &[u8], offset: u64) -> Result<()> {
    match &p.direct {
        Some(direct) => crate::direct::write_all_at(&p.file, direct, chunk, offset),
        None => p.buffered(|| write_all_at(&p.file, chunk, offset)),
    }
    .map_err(|e| CheckpointError::io(&p.path, e))
}

/// Writes a tensor made of parts at `offset`, part by part: file ranges inside the kernel (or
/// in 8 MB chunks where it cannot), computed parts one at a time.
fn write_parts_at(p: &Prepared<'_>, parts: &[crate::tensor::Part], offset: u64) -> Result<u64> {
    let mut at = offset;
    for part in parts {
        let copied = match part {
            crate::Part::File {
                file: src,
                offset: from,
                len,
            } => copy_range_in_kernel(p, src, *from, *len, at)?.is_some(),
            crate::Part::Computed { .. } => false,
        };
        if !copied {
            part.for_each_chunk(&mut |o, chunk| write_chunk_at(p, chunk, at + o))?;
        }
        at += part.len() as u64;
    }
    Ok(at - offset)
}

#[cfg(unix)]
pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(windows)]
pub(crate) fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies a file-backed tensor to `offset` of `p`'s file inside the kernel
/// ([`crate::kernel_copy`]). `None` when the kernel or file system cannot: the caller then
/// copies through memory.
fn copy_in_kernel(p: &Prepared<'_>, t: &Tensor, offset: u64) -> Result<Option<u64>> {
    let Some((src, src_offset)) = t.file_region() else {
        return Ok(None);
    };
    copy_range_in_kernel(p, src, src_offset, t.byte_len(), offset)
}

/// Bytes copied per hold of a file's write lock ([`Prepared::buffered`]) and per start of
/// writeback. A 128 MiB embedding copied whole held the lock for 70 ms, and the other workers'
/// next tensors in that file (norms of a few KiB, queued before the FP8 weights) waited for it
/// with the cores idle; its writeback, started in one call, took 80 ms more. In pieces, the
/// small writes slip in between and the disk gets the copy as it is made (docs/architecture.md,
/// "Output IO").
const COPY_PIECE: usize = 8 << 20;

/// Copies `len` bytes of `src` from `src_offset` to `offset` of `p`'s file inside the kernel,
/// [`COPY_PIECE`] at a time, starting each piece's writeback in a synced save; `None` as for
/// [`copy_in_kernel`], the caller then writing the whole range.
fn copy_range_in_kernel(
    p: &Prepared<'_>,
    src: &crate::SourceFile,
    src_offset: u64,
    len: usize,
    offset: u64,
) -> Result<Option<u64>> {
    let (out, path) = (&p.file, &p.path);
    let mut done = 0;
    while done < len {
        let n = COPY_PIECE.min(len - done);
        let (from, at) = (src_offset + done as u64, offset + done as u64);
        let copy = || crate::kernel_copy::copy_range(out, src, from, n, at, path, p.splices);
        // A refusal after the first piece (none is known: the kernel refuses at the first
        // call) hands the whole range back too; the caller's copy rewrites the same bytes.
        if p.buffered(copy)?.is_none() {
            return Ok(None);
        }
        p.start_writeback(at, n as u64);
        done += n;
    }
    Ok(Some(len as u64))
}

/// Fills in the tensor name of errors raised by anonymous tensor operations.
pub(crate) fn with_tensor_name(e: CheckpointError, name: &str) -> CheckpointError {
    match e {
        CheckpointError::TensorData { tensor, reason } if tensor.is_empty() => {
            CheckpointError::TensorData {
                tensor: name.to_owned(),
                reason,
            }
        }
        other => other,
    }
}

/// The metadata transformers and peft write: `{"format": "pt"}`.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_owned(), "pt".to_owned())])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tensors asked to be written last come after the rest of their file, whose order (and
    /// the round-robin between files) is unchanged.
    #[test]
    fn tensors_written_last_close_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = |dtype| Tensor::from_bytes(dtype, vec![2], vec![0; 8]).unwrap();
        let (scale, weight, norm) = (t(Dtype::F32).written_last(), t(Dtype::F32), t(Dtype::F32));
        let jobs = vec![
            FileJob {
                path: dir.path().join("a"),
                tensors: vec![("a.scale", &scale), ("b.weight", &weight), ("c", &norm)],
                direct: false,
            },
            FileJob {
                path: dir.path().join("b"),
                tensors: vec![("x", &norm), ("y", &norm)],
                direct: false,
            },
        ];
        let prepared = prepare_files(jobs, &BTreeMap::new()).unwrap();
        let names: Vec<&str> = work_list(&prepared, 2)
            .into_iter()
            .map(|w| prepared[w.file].items[w.item].0)
            .collect();
        assert_eq!(names, ["b.weight", "x", "c", "y", "a.scale"]);
        assert_eq!(prepared[0].items[0].0, "a.scale", "file order is kept");
    }

    /// A tensor written after another of its file follows it in the same work item; one that
    /// follows a tensor of another file is written last in its own.
    #[test]
    fn tensors_written_after_another_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = |dtype| Tensor::from_bytes(dtype, vec![2], vec![0; 8]).unwrap();
        let scale = t(Dtype::F32).written_after("b.weight");
        let elsewhere = t(Dtype::F32).written_after("x");
        let (weight, norm) = (t(Dtype::F32), t(Dtype::F32));
        let jobs = vec![
            FileJob {
                path: dir.path().join("a"),
                tensors: vec![
                    ("a.scale", &scale),
                    ("a.z", &elsewhere),
                    ("b.weight", &weight),
                    ("c", &norm),
                ],
                direct: false,
            },
            FileJob {
                path: dir.path().join("b"),
                tensors: vec![("x", &norm)],
                direct: false,
            },
        ];
        let prepared = prepare_files(jobs, &BTreeMap::new()).unwrap();
        let work: Vec<(&str, Vec<&str>)> = work_list(&prepared, 2)
            .into_iter()
            .map(|w| {
                let items = &prepared[w.file].items;
                let followers = w.followers.iter().map(|&i| items[i].0).collect();
                (items[w.item].0, followers)
            })
            .collect();
        let want = [
            ("b.weight", vec!["a.scale"]),
            ("x", vec![]),
            ("c", vec![]),
            ("a.z", vec![]),
        ];
        assert_eq!(work, want);
    }

    /// Followers are written, by the worker of the tensor they follow, right after it: a
    /// follower's producer sees its tensor's producer as the last one run on its thread.
    #[test]
    fn followers_are_written_by_their_tensors_worker_right_after_it() {
        use std::cell::RefCell;
        thread_local!(static LAST: RefCell<String> = const { RefCell::new(String::new()) });
        let dir = tempfile::tempdir().unwrap();
        let n = 16;
        let names: Vec<(String, String)> = (0..n)
            .map(|i| (format!("a{i:02}.scale"), format!("w{i:02}.weight")))
            .collect();
        let mut tensors = Vec::new();
        for (scale, weight) in &names {
            let (s, w, want) = (scale.clone(), weight.clone(), weight.clone());
            let produce_scale = move || {
                let last = LAST.with(|l| l.replace(s.clone()));
                assert_eq!(last, want, "{s} written right after its weight");
                Ok(vec![0u8; 8])
            };
            let produce_weight = move || {
                LAST.with(|l| *l.borrow_mut() = w.clone());
                Ok(vec![0u8; 8])
            };
            let scale_t = Tensor::lazy(Dtype::F32, vec![2], produce_scale).unwrap();
            tensors.push((scale.as_str(), scale_t.written_after(weight)));
            tensors.push((
                weight.as_str(),
                Tensor::lazy(Dtype::F32, vec![2], produce_weight).unwrap(),
            ));
        }
        let jobs = vec![FileJob {
            path: dir.path().join("a"),
            tensors: tensors.iter().map(|(n, t)| (*n, t)).collect(),
            direct: false,
        }];
        let mut wrote = 0;
        write_files(
            jobs,
            &BTreeMap::new(),
            &mut |b| wrote += b,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert_eq!(wrote, 16 * n as u64);
    }

    /// A file-backed tensor longer than a [`COPY_PIECE`], copied in pieces to an offset in
    /// the same place of a page as its source (`copy_file_range`) and in another place (the
    /// pipe), synced and not, is its bytes.
    #[test]
    fn a_tensor_copied_in_pieces_is_its_bytes() {
        use crate::{save_pretrained, Checkpoint, SaveOptions, StateDict};
        let dir = tempfile::tempdir().unwrap();
        let n = 2 * COPY_PIECE + 4099;
        let bytes: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        // `a` comes first in the file: its length moves `big`.
        let state = |a: usize, big: Tensor| {
            let a = Tensor::from_bytes(Dtype::U8, vec![a], vec![7; a]).unwrap();
            StateDict::from([("a".into(), a), ("big".into(), big)])
        };
        let big = Tensor::from_bytes(Dtype::U8, vec![n], bytes.clone()).unwrap();
        let options = SaveOptions::default().durable(false);
        save_pretrained(&dir.path().join("in"), &state(5, big), &options).unwrap();
        let source = Checkpoint::open(&dir.path().join("in")).unwrap();
        let big = source.get("big").unwrap();
        let phase = |t: &Tensor| t.file_region().unwrap().1 % 4096;
        for (a, same_phase) in [(5, true), (8, false)] {
            for durable in [false, true] {
                let out = dir.path().join(format!("out-{a}-{durable}"));
                let options = SaveOptions::default().durable(durable);
                save_pretrained(&out, &state(a, big.clone()), &options).unwrap();
                let got = Checkpoint::open(&out).unwrap();
                let got = got.get("big").unwrap();
                assert_eq!(phase(got) == phase(big), same_phase);
                assert!(
                    *got.bytes().unwrap() == bytes[..],
                    "a {a}, durable {durable}"
                );
            }
        }
    }
}
