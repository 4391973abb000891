//! Tensors whose bytes live elsewhere: in a file region read on demand, in a shared buffer,
//! or produced by a closure when the writer asks for them.
//!
//! Nothing here holds a model in memory. A [`Tensor`] is a cheap handle (dtype, shape and a
//! data source); the bytes are pulled once, by whoever writes or merges it, and dropped right
//! after. A [`StateDict`] is an ordered map of such handles: its order is the order the shard
//! planner sees, exactly like the iteration order of a Python `state_dict`.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
pub use safetensors::Dtype;

use crate::error::{CheckpointError, Result};

/// Bytes of one element of `dtype`, or `None` for sub-byte types (F4, F6).
pub fn dtype_size(dtype: Dtype) -> Option<usize> {
    let bits = dtype.bitsize();
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// The safetensors name of a dtype (`"F32"`, `"BF16"`, `"F8_E4M3"`, …).
pub fn dtype_name(dtype: Dtype) -> String {
    match serde_json::to_value(dtype) {
        Ok(serde_json::Value::String(s)) => s,
        // Dtype serializes as its bare variant name; Debug prints the same text.
        _ => format!("{dtype:?}"),
    }
}

/// Parses a safetensors dtype name. Returns `None` for names this version does not know.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

/// Number of bytes a tensor of this dtype and shape occupies, checked for overflow and for
/// sub-byte dtypes whose bit count is not a whole number of bytes.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let bits = numel.checked_mul(dtype.bitsize())?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// A file that tensors are read from, by position, without mapping it whole.
///
/// Reading with positioned reads (rather than a long-lived mmap) keeps the resident set at
/// the size of the buffer in flight, which is what lets a 70B merge run in a few hundred MB.
#[derive(Debug)]
pub struct SourceFile {
    path: PathBuf,
    pub(crate) file: File,
}

impl SourceFile {
    /// Opens `path` for positioned reads.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        Ok(Arc::new(SourceFile {
            path: path.to_owned(),
            file,
        }))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_exact_at(&self.file, buf, offset).map_err(|e| CheckpointError::io(&self.path, e))
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Recycled byte buffers for tensor data.
///
/// Reading or merging a tensor needs a buffer of its size; a fresh allocation of tens of MB is
/// a fresh `mmap` whose pages fault in one by one, which costs more than the read itself. The
/// writer hands buffers back once written, so a save cycles through a few of them.
pub mod buffers {
    use std::sync::Mutex;

    /// At most this many idle buffers are kept…
    const MAX_IDLE: usize = 4;
    /// …holding at most this many bytes in all.
    const MAX_IDLE_BYTES: usize = 2 << 30;

    /// Buffers smaller than this are plain allocations, never pooled.
    const MIN_POOLED: usize = 1 << 20;

    static IDLE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// A buffer of `len` bytes, reusing an idle one when one is large enough.
    ///
    /// Its contents are unspecified (zeros or bytes of an earlier tensor): callers overwrite
    /// them. A reused buffer is not cleared, because zeroing hundreds of megabytes per merge
    /// costs as much as reading them; only bytes beyond what it held before are zeroed.
    pub fn take(len: usize) -> Vec<u8> {
        if len < MIN_POOLED {
            // Small reads (adapter factors, norms) are not worth a pooled buffer, and would
            // carry a large one away: they are dropped, not given back.
            return vec![0; len];
        }
        let reused = IDLE.lock().ok().and_then(|mut idle| {
            let best = idle
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)?;
            Some(idle.swap_remove(best))
        });
        let mut buf = reused.unwrap_or_default();
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    /// Returns a buffer for reuse. When the pool is full, it replaces the smallest idle buffer
    /// if it is larger, so that the pool converges on buffers that fit the largest tensors
    /// (a fresh allocation costs a page fault per 4 KiB).
    pub fn give(buf: Vec<u8>) {
        if buf.capacity() < MIN_POOLED {
            return;
        }
        if let Ok(mut idle) = IDLE.lock() {
            if idle.len() >= MAX_IDLE {
                let smallest = idle
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, b)| (i, b.capacity()));
                match smallest {
                    Some((i, cap)) if cap < buf.capacity() => drop(idle.swap_remove(i)),
                    _ => return,
                }
            }
            let held: usize = idle.iter().map(Vec::capacity).sum();
            if held + buf.capacity() <= MAX_IDLE_BYTES {
                idle.push(buf);
            }
        }
    }
}

/// A closure that produces a tensor's bytes when they are needed.
pub type Producer = dyn Fn() -> Result<Vec<u8>> + Send + Sync;

/// A change made in place to the bytes of a source tensor: a merge into a base weight.
///
/// A tensor built by [`Tensor::edited`] has the source's dtype, shape and length. Whoever reads
/// it gets the source's bytes after [`InPlaceEdit::apply`]. The writer can do better when its
/// output goes through the page cache: it lets [`InPlaceEdit::apply_in_file`] write the edited
/// bytes into the output file itself, reading the source as it goes, so that no buffer holds
/// the whole tensor (see docs/architecture.md, "Output IO"). In a synced save the region
/// writes around the page cache ([`OutputRegion::is_direct`]).
pub trait InPlaceEdit: Send + Sync {
    /// Turns `bytes`, the source tensor's bytes, into the edited tensor's.
    fn apply(&self, bytes: &mut [u8]) -> Result<()>;

    /// Writes what [`InPlaceEdit::apply`] makes of `source`'s bytes into `out`, a range of an
    /// output file that nothing has written yet. Returns `Ok(false)`, having written nothing,
    /// when it cannot (the writer then writes the bytes of `apply` there). The default cannot.
    fn apply_in_file(&self, _source: SourceRegion<'_>, _out: &OutputRegion<'_>) -> Result<bool> {
        Ok(false)
    }
}

/// A tensor computed when written that can write itself into its range of the output file piece
/// by piece, so that no buffer holds it whole: a tensor of another dtype or length than the
/// one it is computed from, such as a dequantized FP8 weight ([`Tensor::streamed`]).
pub trait StreamedTensor: Send + Sync {
    /// The tensor's bytes, whole (for readers other than the writer, or where streaming
    /// cannot be done).
    fn bytes(&self) -> Result<Vec<u8>>;

    /// Writes the tensor's bytes into `out`, a range of an output file that nothing has
    /// written yet, piece by piece. Returns `Ok(false)`, having written nothing, when it
    /// cannot (the writer then writes the bytes of [`StreamedTensor::bytes`] there).
    fn write_in_file(&self, out: &OutputRegion<'_>) -> Result<bool>;
}

/// Where an edited or streamed tensor goes in an output file ([`InPlaceEdit::apply_in_file`],
/// [`StreamedTensor::write_in_file`]): `len` bytes at `offset` of a file opened for reading and
/// writing.
pub struct OutputRegion<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    /// Whether the file system lets the range be written through a shared mapping
    /// (`in_file::edits_in_file`).
    pub(crate) mappable: bool,
    /// Held by each write through the page cache into the file (see `Prepared::buffered`).
    pub(crate) writing: &'a std::sync::Mutex<()>,
    /// The file's handle for writes around the page cache, in a synced save (`direct`).
    pub(crate) direct: Option<&'a File>,
    /// Whether the save is synced: writes through the page cache then start their writeback
    /// at once.
    pub(crate) synced: bool,
    /// Whether, in a synced save, a tensor computed block by block goes through the page cache
    /// rather than whole around it ([`OutputRegion::in_blocks`]).
    pub(crate) blocks_in_cache: bool,
}

impl<'a> OutputRegion<'a> {
    /// The region's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `bytes` at byte `at` of the region: their 4 KiB-aligned middle around the page
    /// cache where the region has a direct handle (a synced save: `O_DIRECT`, see
    /// docs/architecture.md, "Output IO"; bytes placed by [`OutputRegion::place`] need no
    /// bounce copy), else through the page cache, their writeback started at once in a synced
    /// save.
    pub fn write_at(&self, at: usize, bytes: &[u8]) -> Result<()> {
        let offset = self.offset + at as u64;
        let written = match self.direct {
            Some(direct) => crate::direct::write_all_at(self.file, direct, bytes, offset),
            None => {
                let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
                crate::safetensors_file::write_all_at(self.file, bytes, offset)
            }
        };
        written.map_err(|e| CheckpointError::io(self.path, e))?;
        if self.direct.is_none() && self.synced {
            crate::safetensors_file::start_writeback(self.file, offset, bytes.len() as u64);
        }
        Ok(())
    }

    /// The region written block by block through the page cache, for a tensor computed a block
    /// at a time in cache (a merged weight streamed from its base), or `None` where the caller
    /// should compute it whole for the writer to write around the page cache.
    ///
    /// An unsynced save always streams. A synced one streams when its whole output fits in
    /// the memory the kernel has free (`direct::blocks_in_cache`): each block's writeback then
    /// starts as soon as it is written, and the disk works beside the next blocks' arithmetic,
    /// where one direct write of a whole tensor makes its worker wait for the device. An
    /// output that does not fit would make every page written wait for another to be
    /// reclaimed; there direct writes are faster (docs/architecture.md, "Output IO").
    pub fn in_blocks(&self) -> Option<OutputRegion<'a>> {
        if self.direct.is_some() && !self.blocks_in_cache {
            return None;
        }
        Some(OutputRegion {
            direct: None,
            ..*self
        })
    }

    /// The range of `buf` (grown as needed) where to compute `len` bytes bound for byte `at` of
    /// the region, so that [`OutputRegion::write_at`] sends them to the disk from there: at an
    /// address aligned as their file offset is, in a synced save; at the start otherwise.
    pub fn place(&self, at: usize, len: usize, buf: &mut Vec<u8>) -> Range<usize> {
        let Some(_) = self.direct else {
            buf.resize(buf.len().max(len), 0);
            return 0..len;
        };
        buf.resize(buf.len().max(len + crate::direct::ALIGN), 0);
        let skip = crate::direct::phase_skip(buf, self.offset + at as u64);
        skip..skip + len
    }

    /// Whether writes go around the page cache (a synced save: see [`OutputRegion::write_at`]).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Bytes per write that suit the region: about 1 MiB through the page cache (a block
    /// computed in cache is copied from cache), more where writes go around it (each write's
    /// unaligned edges go through the page cache, and a middle under 1 MiB is not worth a
    /// direct write).
    pub fn write_size(&self) -> usize {
        match self.direct {
            Some(_) => 2 << 20,
            None => 1 << 20,
        }
    }

    /// Reads byte `at..at + buf.len()` of the region back.
    pub fn read_at(&self, at: usize, buf: &mut [u8]) -> Result<()> {
        read_exact_at(self.file, buf, self.offset + at as u64)
            .map_err(|e| CheckpointError::io(self.path, e))
    }

    /// The file and the region's offset in it, allocated, for an edit written through a
    /// shared mapping of the region; `None` where that is not safe (see
    /// docs/architecture.md, "Output IO") or the file system cannot allocate ahead. A full
    /// disk is an error.
    pub fn mappable(&self) -> Result<Option<(&File, u64)>> {
        if !self.mappable || !crate::in_file::allocate(self.file, self.offset, self.len, self.path)?
        {
            return Ok(None);
        }
        Ok(Some((self.file, self.offset)))
    }
}

/// Where an edited tensor's source bytes lie: a byte offset in a [`SourceFile`]. An edit made
/// in the output file ([`InPlaceEdit::apply_in_file`]) reads them from here, in pieces, as it
/// goes.
#[derive(Clone, Copy)]
pub struct SourceRegion<'a> {
    file: &'a SourceFile,
    offset: u64,
}

impl<'a> SourceRegion<'a> {
    /// The source tensor's bytes from absolute byte `offset` of `file`.
    pub fn new(file: &'a SourceFile, offset: u64) -> Self {
        SourceRegion { file, offset }
    }

    /// Reads the source tensor's bytes `at..at + buf.len()` into `buf`.
    pub fn read_at(&self, at: usize, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, self.offset + at as u64)
    }
}

/// One piece of a tensor assembled from pieces ([`Tensor::from_parts`]), in the tensor's byte
/// order.
///
/// A tensor whose bytes are, in order, ranges of source files (a fused expert tensor is its
/// experts' tensors one after the other) is written range by range inside the kernel, the way
/// an untouched tensor is; only the parts that must be computed pass through memory, each on
/// its own, so the memory a write needs is one part, whatever the tensor's size.
#[derive(Clone)]
pub enum Part {
    /// `len` bytes of `file` from absolute byte `offset`.
    File {
        /// The file read (see [`Tensor::source_file`]).
        file: Arc<SourceFile>,
        /// Absolute byte offset in the file.
        offset: u64,
        /// Number of bytes.
        len: usize,
    },
    /// `len` bytes computed by `produce` when written.
    Computed {
        /// Number of bytes `produce` returns.
        len: usize,
        /// The closure; it may be called more than once.
        produce: Arc<Producer>,
    },
}

impl Part {
    /// Number of bytes of the part.
    pub fn len(&self) -> usize {
        match self {
            Part::File { len, .. } | Part::Computed { len, .. } => *len,
        }
    }

    /// Whether the part holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f(position in the part, bytes)` over the part's bytes in order: 8 MB chunks of
    /// a file range, one call for a computed part (its buffer then goes back to the pool).
    pub(crate) fn for_each_chunk(&self, f: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        match self {
            Part::File { file, offset, len } => for_each_file_chunk(file, *offset, *len, f),
            Part::Computed { .. } => {
                let bytes = self.bytes()?;
                f(0, &bytes)?;
                buffers::give(bytes);
                Ok(())
            }
        }
    }

    /// The part's bytes, read or computed: a pooled buffer (see [`buffers`]).
    fn bytes(&self) -> Result<Vec<u8>> {
        match self {
            Part::File { file, offset, len } => {
                let mut out = buffers::take(*len);
                file.read_exact_at(&mut out, *offset)?;
                Ok(out)
            }
            Part::Computed { len, produce } => {
                let out = produce()?;
                check_produced(out.len(), *len)?;
                Ok(out)
            }
        }
    }
}

impl fmt::Debug for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::File { file, offset, len } => {
                write!(f, "{}@{offset}+{len}", file.path.display())
            }
            Part::Computed { len, .. } => write!(f, "computed+{len}"),
        }
    }
}

fn check_produced(got: usize, expected: usize) -> Result<()> {
    if got == expected {
        return Ok(());
    }
    Err(CheckpointError::TensorData {
        tensor: String::new(),
        reason: format!("producer returned {got} bytes, {expected} expected"),
    })
}

#[derive(Clone)]
enum Data {
    /// A byte range of a shared buffer. Two tensors on the same buffer alias when their
    /// ranges overlap, which is how tied weights look in memory.
    Buffer {
        buf: Arc<Vec<u8>>,
        range: Range<usize>,
    },
    /// A byte range of a file.
    File { file: Arc<SourceFile>, offset: u64 },
    /// Bytes computed on demand (a merge, a dtype cast, a remap op).
    Lazy(Arc<Producer>),
    /// Bytes computed on demand, streamed into the output file by the writer.
    Streamed(Arc<dyn StreamedTensor>),
    /// The bytes of a source tensor, changed in place when needed (a merge).
    Edited {
        source: Box<Tensor>,
        edit: Arc<dyn InPlaceEdit>,
    },
    /// Pieces one after the other (a remapped tensor: file ranges and computed chunks).
    Parts(Arc<[Part]>),
}

/// Where a tensor's bytes live, for alias detection: two tensors with the same key and
/// overlapping ranges share storage.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct StorageKey {
    pub(crate) ptr: usize,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// A handle on one tensor: dtype, shape, and where its little-endian bytes come from.
///
/// ```
/// use peftkit_checkpoint::{Dtype, Tensor};
/// let t = Tensor::from_bytes(Dtype::F32, vec![2], 1.5f32.to_le_bytes().repeat(2)).unwrap();
/// assert_eq!(t.byte_len(), 8);
/// assert_eq!(&*t.bytes().unwrap(), &[0, 0, 192, 63, 0, 0, 192, 63]);
/// ```
#[derive(Clone)]
pub struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
    data: Data,
    family: Option<u64>,
    /// Written after the other tensors of its file ([`Tensor::written_last`]).
    last: bool,
    /// Written right after this tensor of its file ([`Tensor::written_after`]).
    after: Option<Arc<str>>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.data {
            Data::Buffer { .. } => "buffer".to_owned(),
            Data::File { file, offset } => format!("{}@{offset}", file.path.display()),
            Data::Lazy(_) => "lazy".to_owned(),
            Data::Streamed(_) => "streamed".to_owned(),
            Data::Edited { source, .. } => format!("edited {source:?}"),
            Data::Parts(parts) => format!("{} parts", parts.len()),
        };
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("source", &source)
            .finish()
    }
}

fn checked_len(dtype: Dtype, shape: &[usize]) -> Result<usize> {
    byte_len(dtype, shape).ok_or_else(|| CheckpointError::TensorData {
        tensor: String::new(),
        reason: format!(
            "shape {shape:?} of {} does not fit in memory or is not a whole number of bytes",
            dtype_name(dtype)
        ),
    })
}

impl Tensor {
    /// A tensor that owns its bytes.
    pub fn from_bytes(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        let len = bytes.len();
        Self::from_shared(dtype, shape, Arc::new(bytes), 0..len)
    }

    /// A view of `range` in a shared buffer. Views of one buffer whose ranges overlap are
    /// aliases (tied weights); the writer refuses aliases that no tie declares.
    pub fn from_shared(
        dtype: Dtype,
        shape: Vec<usize>,
        buf: Arc<Vec<u8>>,
        range: Range<usize>,
    ) -> Result<Self> {
        let len = checked_len(dtype, &shape)?;
        if range.end > buf.len() || range.start > range.end || range.len() != len {
            return Err(CheckpointError::TensorData {
                tensor: String::new(),
                reason: format!(
                    "{} bytes expected for {} {:?}, got range {:?} of a {}-byte buffer",
                    len,
                    dtype_name(dtype),
                    shape,
                    range,
                    buf.len()
                ),
            });
        }
        Ok(Tensor {
            dtype,
            shape,
            len,
            data: Data::Buffer { buf, range },
            family: None,
            last: false,
            after: None,
        })
    }

    /// A tensor read from `file` at absolute byte `offset` when needed.
    pub fn from_file(
        dtype: Dtype,
        shape: Vec<usize>,
        file: Arc<SourceFile>,
        offset: u64,
    ) -> Result<Self> {
        let len = checked_len(dtype, &shape)?;
        Ok(Tensor {
            dtype,
            shape,
            len,
            data: Data::File { file, offset },
            family: None,
            last: false,
            after: None,
        })
    }

    /// A tensor whose bytes `produce` computes when the writer reaches it. The closure must
    /// return exactly `byte_len(dtype, shape)` bytes; it may be called more than once.
    pub fn lazy(
        dtype: Dtype,
        shape: Vec<usize>,
        produce: impl Fn() -> Result<Vec<u8>> + Send + Sync + 'static,
    ) -> Result<Self> {
        let len = checked_len(dtype, &shape)?;
        Ok(Tensor {
            dtype,
            shape,
            len,
            data: Data::Lazy(Arc::new(produce)),
            family: None,
            last: false,
            after: None,
        })
    }

    /// A tensor computed by `streamed` when it is needed, which the writer lets write itself
    /// into the output file piece by piece (see [`StreamedTensor`]). Its bytes must be exactly
    /// `byte_len(dtype, shape)`.
    ///
    /// ```
    /// use peftkit_checkpoint::{Dtype, OutputRegion, Result, StreamedTensor, Tensor};
    ///
    /// struct Ones(usize);
    /// impl StreamedTensor for Ones {
    ///     fn bytes(&self) -> Result<Vec<u8>> {
    ///         Ok(vec![1; self.0])
    ///     }
    ///     fn write_in_file(&self, out: &OutputRegion<'_>) -> Result<bool> {
    ///         for at in (0..self.0).step_by(2) {
    ///             out.write_at(at, &[1, 1])?; // two bytes at a time
    ///         }
    ///         Ok(true)
    ///     }
    /// }
    /// let t = Tensor::streamed(Dtype::U8, vec![4], Ones(4))?;
    /// assert_eq!(&*t.bytes()?, &[1, 1, 1, 1]);
    /// # Ok::<(), peftkit_checkpoint::CheckpointError>(())
    /// ```
    pub fn streamed(
        dtype: Dtype,
        shape: Vec<usize>,
        streamed: impl StreamedTensor + 'static,
    ) -> Result<Self> {
        let len = checked_len(dtype, &shape)?;
        Ok(Tensor {
            dtype,
            shape,
            len,
            data: Data::Streamed(Arc::new(streamed)),
            family: None,
            last: false,
            after: None,
        })
    }

    /// `source`, changed by `edit` when its bytes are needed (see [`InPlaceEdit`]).
    ///
    /// ```
    /// use peftkit_checkpoint::{Dtype, InPlaceEdit, Result, Tensor};
    ///
    /// struct Negate;
    /// impl InPlaceEdit for Negate {
    ///     fn apply(&self, bytes: &mut [u8]) -> Result<()> {
    ///         bytes.chunks_exact_mut(4).for_each(|c| c[3] ^= 0x80); // f32 sign bits
    ///         Ok(())
    ///     }
    /// }
    /// let t = Tensor::from_bytes(Dtype::F32, vec![1], 2.0f32.to_le_bytes().to_vec())?;
    /// let negated = Tensor::edited(t, Negate);
    /// assert_eq!(&*negated.bytes()?, &(-2.0f32).to_le_bytes());
    /// # Ok::<(), peftkit_checkpoint::CheckpointError>(())
    /// ```
    pub fn edited(source: Tensor, edit: impl InPlaceEdit + 'static) -> Self {
        Tensor {
            dtype: source.dtype,
            shape: source.shape.clone(),
            len: source.len,
            family: None,
            last: false,
            after: None,
            data: Data::Edited {
                source: Box::new(source),
                edit: Arc::new(edit),
            },
        }
    }

    /// A tensor whose bytes are `parts` one after the other (see [`Part`]). The parts must add
    /// up to `byte_len(dtype, shape)` bytes. Such a tensor never aliases another one.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use peftkit_checkpoint::{Dtype, Part, Tensor};
    /// let half = |v: u8| Part::Computed { len: 4, produce: Arc::new(move || Ok(vec![v; 4])) };
    /// let t = Tensor::from_parts(Dtype::F32, vec![2], vec![half(1), half(2)]).unwrap();
    /// assert_eq!(&*t.bytes().unwrap(), &[1, 1, 1, 1, 2, 2, 2, 2]);
    /// ```
    pub fn from_parts(dtype: Dtype, shape: Vec<usize>, parts: Vec<Part>) -> Result<Self> {
        let len = checked_len(dtype, &shape)?;
        let total: usize = parts.iter().map(Part::len).sum();
        if total != len {
            return Err(CheckpointError::TensorData {
                tensor: String::new(),
                reason: format!(
                    "parts of {total} bytes for {} {shape:?} ({len} bytes)",
                    dtype_name(dtype)
                ),
            });
        }
        Ok(Tensor {
            dtype,
            shape,
            len,
            data: Data::Parts(parts.into()),
            family: None,
            last: false,
            after: None,
        })
    }

    /// Marks this tensor as a member of a storage family: tensors that transformers would hold
    /// as views of one storage (the per-expert weights split from a fused expert tensor). The
    /// shard planner places a family as one unit at its first member, like huggingface_hub.
    pub fn in_family(mut self, family: u64) -> Self {
        self.family = Some(family);
        self
    }

    /// Asks the writer to write this tensor after the other tensors of its file. For a tensor
    /// whose bytes are a by-product of another's computation (the scales of a re-quantized FP8
    /// weight, which precede the weight in file order): the other is computed first and leaves
    /// them behind, instead of the by-product computing the other too. Only the order in which
    /// workers take tensors changes, never where they lie in the file.
    pub fn written_last(mut self) -> Self {
        self.last = true;
        self
    }

    /// Whether [`Tensor::written_last`] (or [`Tensor::written_after`]) was asked for.
    pub fn is_written_last(&self) -> bool {
        self.last
    }

    /// [`Tensor::written_last`], refined: when tensor `name` lies in the same file, this one is
    /// written right after it, by the worker that wrote it. For a by-product that precedes
    /// its tensor in file order (a re-quantized weight's scales): it is taken from what the
    /// computation left as soon as it is made, instead of waiting for the end of the file
    /// (holding the by-products of every weight of a file would not be bounded).
    pub fn written_after(mut self, name: &str) -> Self {
        self.last = true;
        self.after = Some(name.into());
        self
    }

    /// The tensor named by [`Tensor::written_after`], if any.
    pub fn follows(&self) -> Option<&str> {
        self.after.as_deref()
    }

    /// The storage family, if any (see [`Tensor::in_family`]).
    pub fn family(&self) -> Option<u64> {
        self.family
    }

    /// Element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Shape (empty for a scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the data in bytes.
    pub fn byte_len(&self) -> usize {
        self.len
    }

    /// The tensor's bytes: borrowed for buffers, read or computed otherwise.
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        match &self.data {
            Data::Buffer { buf, range } => Ok(Cow::Borrowed(&buf[range.clone()])),
            Data::File { file, offset } => {
                let mut out = buffers::take(self.len);
                file.read_exact_at(&mut out, *offset)?;
                Ok(Cow::Owned(out))
            }
            Data::Lazy(produce) => {
                let out = produce()?;
                check_produced(out.len(), self.len)?;
                Ok(Cow::Owned(out))
            }
            Data::Streamed(streamed) => {
                let out = streamed.bytes()?;
                check_produced(out.len(), self.len)?;
                Ok(Cow::Owned(out))
            }
            Data::Parts(parts) => {
                let mut out = buffers::take(self.len);
                let mut at = 0usize;
                for part in parts.iter() {
                    let bytes = part.bytes()?;
                    out[at..at + bytes.len()].copy_from_slice(&bytes);
                    at += bytes.len();
                    buffers::give(bytes);
                }
                Ok(Cow::Owned(out))
            }
            Data::Edited { source, edit } => {
                let mut out = source.bytes()?.into_owned();
                edit.apply(&mut out)?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Streams the bytes into `out` in bounded chunks (file-backed tensors never sit in
    /// memory whole). Returns the number of bytes written.
    pub fn write_to(&self, out: &mut dyn Write, out_path: &Path) -> Result<u64> {
        self.for_each_chunk(&mut |_, chunk| {
            out.write_all(chunk)
                .map_err(|e| CheckpointError::io(out_path, e))
        })
    }

    /// Calls `f(position in the tensor, bytes)` over the tensor's bytes in order: 8 MB chunks
    /// for file-backed tensors and file parts (never in memory whole), one call per computed
    /// part, one call otherwise. Buffers go back to the pool. Returns the number of bytes.
    pub(crate) fn for_each_chunk(
        &self,
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        match &self.data {
            Data::File { file, offset } => {
                for_each_file_chunk(file, *offset, self.len, &mut |at, c| f(at, c))?;
            }
            Data::Parts(parts) => {
                let mut at = 0u64;
                for part in parts.iter() {
                    part.for_each_chunk(&mut |o, c| f(at + o, c))?;
                    at += part.len() as u64;
                }
            }
            _ => {
                let bytes = self.bytes()?;
                f(0, &bytes)?;
                if let Cow::Owned(buf) = bytes {
                    buffers::give(buf);
                }
            }
        }
        Ok(self.len as u64)
    }

    /// The parts of a tensor made of parts ([`Tensor::from_parts`]).
    pub(crate) fn parts(&self) -> Option<&[Part]> {
        match &self.data {
            Data::Parts(parts) => Some(parts),
            _ => None,
        }
    }

    /// The open file and absolute offset of a file-backed tensor, for in-kernel copies.
    pub(crate) fn file_region(&self) -> Option<(&SourceFile, u64)> {
        match &self.data {
            Data::File { file, offset } => Some((file, *offset)),
            _ => None,
        }
    }

    /// The file region of an edited tensor's source and its edit, for edits in the output file.
    pub(crate) fn edited_file_region(&self) -> Option<(&SourceFile, u64, &dyn InPlaceEdit)> {
        match &self.data {
            Data::Edited { source, edit } => {
                let (file, offset) = source.file_region()?;
                Some((file, offset, edit.as_ref()))
            }
            _ => None,
        }
    }

    /// The computation of a streamed tensor ([`Tensor::streamed`]), for the writer.
    pub(crate) fn streamed_computation(&self) -> Option<&dyn StreamedTensor> {
        match &self.data {
            Data::Streamed(s) => Some(s.as_ref()),
            _ => None,
        }
    }

    /// Whether some of the bytes are computed (by a closure, a stream or an edit) rather than
    /// held or read as they are.
    pub fn is_computed(&self) -> bool {
        match &self.data {
            Data::Lazy(_) | Data::Streamed(_) | Data::Edited { .. } => true,
            Data::Parts(parts) => parts.iter().any(|p| matches!(p, Part::Computed { .. })),
            _ => false,
        }
    }

    /// Where the bytes live, for alias detection; `None` for computed tensors, which never
    /// alias anything.
    pub(crate) fn storage_key(&self) -> Option<StorageKey> {
        match &self.data {
            Data::Buffer { buf, range } => Some(StorageKey {
                ptr: Arc::as_ptr(buf) as usize,
                start: range.start as u64,
                end: range.end as u64,
            }),
            Data::File { file, offset } => Some(StorageKey {
                ptr: Arc::as_ptr(file) as usize,
                start: *offset,
                end: offset + self.len as u64,
            }),
            Data::Lazy(_) | Data::Streamed(_) | Data::Edited { .. } | Data::Parts(_) => None,
        }
    }

    /// The file and absolute offset a file-backed tensor is read from.
    pub fn file_source(&self) -> Option<(&Path, u64)> {
        match &self.data {
            Data::File { file, offset } => Some((file.path(), *offset)),
            _ => None,
        }
    }

    /// The open file and absolute offset a file-backed tensor is read from, to build
    /// [`Part::File`]s of it or read parts of it ([`SourceFile::read_exact_at`]).
    pub fn source_file(&self) -> Option<(&Arc<SourceFile>, u64)> {
        match &self.data {
            Data::File { file, offset } => Some((file, *offset)),
            _ => None,
        }
    }
}

/// Calls `f(position, bytes)` over `len` bytes of `file` from `offset`, in 8 MB chunks read
/// into one pooled buffer.
fn for_each_file_chunk(
    file: &SourceFile,
    offset: u64,
    len: usize,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    const CHUNK: usize = 8 << 20;
    let mut buf = buffers::take(CHUNK.min(len));
    let mut done = 0usize;
    while done < len {
        let n = CHUNK.min(len - done);
        file.read_exact_at(&mut buf[..n], offset + done as u64)?;
        f(done as u64, &buf[..n])?;
        done += n;
    }
    buffers::give(buf);
    Ok(())
}

/// An ordered map of tensor names to tensors, like a Python `state_dict`: the order is the
/// order shards are planned in.
pub type StateDict = IndexMap<String, Tensor>;
