//! A merged tensor's bytes between files: the base read from its file, the result written to
//! the output file, block by block.
//!
//! An unsynced merge streams each weight through the fused kernel in blocks of about 1 MiB:
//! `pread` a block of the base into a small buffer, merge it there, `pwrite` it to the output,
//! all while the block is in cache. That touches memory once for reading and once for writing,
//! as `cp` does, and needs no buffer of the tensor's size (docs/architecture.md, "Output IO").

use std::sync::Mutex;

use peftkit_checkpoint::{CheckpointError, OutputRegion, SourceRegion};

use crate::kernels::{BaseSource, BlockIo};

/// A base tensor in its file, as the kernels read it block by block ([`BaseSource`]). The
/// first failed read is kept, typed, for the edit to return ([`FileSource::take_error`]).
pub(crate) struct FileSource<'a> {
    region: SourceRegion<'a>,
    error: Mutex<Option<CheckpointError>>,
}

impl<'a> FileSource<'a> {
    pub(crate) fn new(region: SourceRegion<'a>) -> Self {
        FileSource {
            region,
            error: Mutex::new(None),
        }
    }

    /// The first read (or, for [`FileBlocks`], write) that failed, if any.
    pub(crate) fn take_error(&self) -> Option<CheckpointError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Whether `result` is a success; keeps its error otherwise.
    fn keep(&self, result: Result<(), CheckpointError>) -> bool {
        match result {
            Ok(()) => true,
            Err(e) => {
                self.error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                false
            }
        }
    }
}

impl BaseSource for FileSource<'_> {
    fn fill(&self, at: usize, into: &mut [u8]) -> bool {
        self.keep(self.region.read_at(at, into))
    }
}

/// A base tensor streamed from its file to its range of the output file ([`BlockIo`]).
pub(crate) struct FileBlocks<'a> {
    pub(crate) source: FileSource<'a>,
    out: &'a OutputRegion<'a>,
}

impl<'a> FileBlocks<'a> {
    pub(crate) fn new(source: SourceRegion<'a>, out: &'a OutputRegion<'a>) -> Self {
        FileBlocks {
            source: FileSource::new(source),
            out,
        }
    }
}

impl BaseSource for FileBlocks<'_> {
    fn fill(&self, at: usize, into: &mut [u8]) -> bool {
        self.source.fill(at, into)
    }
}

impl BlockIo for FileBlocks<'_> {
    fn flush(&self, at: usize, bytes: &[u8]) -> bool {
        self.source.keep(self.out.write_at(at, bytes))
    }
}
