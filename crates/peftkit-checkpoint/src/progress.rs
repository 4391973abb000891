//! The one progress mechanism of the workspace: a callback stored in an options struct.

use std::fmt;
use std::sync::Arc;

/// A callback told how many bytes of tensor data were just written; none by default.
///
/// It lives in the options of a long operation (a field, not a twin `_with_progress`
/// function), so a new option never changes a signature. The callback is `Fn + Send + Sync`
/// so that options stay `Clone` and can cross threads: a progress bar or an atomic counter
/// fits, a `&mut` total does not (use an `AtomicU64`).
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use peftkit_checkpoint::Progress;
///
/// let total = Arc::new(AtomicU64::new(0));
/// let seen = total.clone();
/// let progress = Progress::new(move |n| {
///     seen.fetch_add(n, Ordering::Relaxed);
/// });
/// progress.report(3);
/// progress.clone().report(4);
/// Progress::default().report(5); // no callback: nothing happens
/// assert_eq!(total.load(Ordering::Relaxed), 7);
/// ```
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<dyn Fn(u64) + Send + Sync>>);

impl Progress {
    /// A progress that calls `on_bytes` with the byte count of every write.
    pub fn new(on_bytes: impl Fn(u64) + Send + Sync + 'static) -> Self {
        Progress(Some(Arc::new(on_bytes)))
    }

    /// Tells the callback, if there is one, that `bytes` more bytes were written.
    pub fn report(&self, bytes: u64) {
        if let Some(f) = &self.0 {
            f(bytes)
        }
    }
}

/// Any byte-count callback is a [`Progress`], so setters taking `impl Into<Progress>` take a
/// closure.
impl<F: Fn(u64) + Send + Sync + 'static> From<F> for Progress {
    fn from(on_bytes: F) -> Self {
        Progress::new(on_bytes)
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "Progress(callback)",
            None => "Progress(none)",
        })
    }
}
