//! Numbers for people in the text outputs (`--json` keeps exact integers): sizes in decimal
//! units, as `--max-shard-size` and the Hub count them, and counts with thousands separators.

use indicatif::{DecimalBytes, HumanCount};

/// `805.33 MB`.
pub(crate) fn bytes(n: u64) -> String {
    DecimalBytes(n).to_string()
}

/// `805,333,312`.
pub(crate) fn count(n: u64) -> String {
    HumanCount(n).to_string()
}

/// `1 file` / `3 files`.
pub(crate) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{} {}", count(n as u64), if n == 1 { one } else { many })
}
