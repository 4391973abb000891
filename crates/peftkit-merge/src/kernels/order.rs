//! Which reduction order the low-rank product reproduces: MKL's, as chosen on this host.
//!
//! torch's CPU matmul calls MKL `sgemm`, and MKL picks its kernel, and with it the order in
//! which the rank `k` of `B @ A` is summed, by CPU. The orders peftkit reproduces were measured
//! against torch 2.15 (MKL 2024.2) on each family of hosts and are kept here as data, one
//! [`Blocking`] per [`ReductionOrder`]:
//!
//! | order | measured on | `k` in one block | two blocks | longer |
//! |---|---|---|---|---|
//! | [`ReductionOrder::MklAmd`] | AMD EPYC Zen 3 (AVX2), Zen 4 (AVX-512) | `k ≤ 192` | `k ≤ 384`: `⌊k/2⌋ + ⌊k/2⌋ (+ 1)` | blocks of 192 |
//! | [`ReductionOrder::MklIntelAvx512`] | Intel Xeon Sapphire Rapids (AVX-512, AMX) | `k ≤ 384` | `k ≤ 768`: `⌈k/2⌉ + ⌊k/2⌋` | blocks of 384 (see below) |
//!
//! On Intel, ranks above 768 are not verified: with one thread MKL keeps blocks of 384 only
//! when both sides of the product are at least 192 (otherwise it splits the last 385–768 in
//! halves), and with two or more threads it may split the rank between the threads first, by
//! thresholds on the shape. The product of a row or column vector (a side of 1) goes through
//! interleaved-lane kernels on Intel, and everything narrower than 4 × 12 through other
//! kernels on AMD. `MKL_CBWR=AVX2` on the Intel host gives the AMD blocking on wide products,
//! which suggests that AMD hosts run MKL's AVX2 path whatever their ISA.
//!
//! Inside a block every element is accumulated from `0` with one fused multiply-add per rank
//! index, in increasing order; blocks are added left to right (see [`super::gemm`]).
//!
//! Each order is *verified* on a domain of product shapes (see [`ReductionOrder::verified`]);
//! outside it (tiny products, very high ranks on Intel, an unmeasured CPU) the merge still
//! runs, with the order of the closest family, and the result agrees with peft to the bound in
//! [`UNVERIFIED_BOUND_ULP`], which the merge summary reports.
//!
//! The host's order is detected once. `PEFTKIT_REDUCTION_ORDER=mkl-amd|mkl-intel-avx512`
//! (read at first use) or [`set_reduction_order`] overrides it, the way `MKL_CBWR` steers MKL:
//! to reproduce on one machine a merge made on another.

use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// A reduction order of MKL's `sgemm` for `B @ A`, as measured on one family of hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReductionOrder {
    /// MKL on AMD EPYC (Zen 3 with AVX2, Zen 4 with AVX-512).
    MklAmd,
    /// MKL on Intel Xeon with AVX-512 (measured on Sapphire Rapids, with AMX).
    MklIntelAvx512,
}

/// How an order splits the rank into blocks (the data behind [`ReductionOrder::k_blocks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// Ranks up to this are one block; fixed blocks beyond twice this have this length.
    pub block: usize,
    /// How a rank in `block + 1 ..= 2·block` is split in two.
    pub halves: Halves,
    /// Largest rank verified for every product shape in the verified domain.
    pub verified_rank: usize,
    /// Smallest product (rows of `B`, columns of `A`) verified.
    pub verified_min_dims: (usize, usize),
    /// Smallest product verified in a batch (peft's `einsum` over MoE experts, which torch
    /// runs as a batched matmul: narrower products there are not fused multiply-adds).
    pub verified_min_dims_batched: (usize, usize),
}

/// The two-block split of a rank `k` with `block < k ≤ 2·block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halves {
    /// `⌊k/2⌋ + ⌊k/2⌋`, and a block of one when `k` is odd (193 → 96 + 96 + 1).
    FloorWithTail,
    /// `⌈k/2⌉ + ⌊k/2⌋` (385 → 193 + 192).
    CeilFirst,
}

/// Every order and its blocking: the measurements, as data.
const BLOCKINGS: [(ReductionOrder, Blocking); 2] = [
    (
        ReductionOrder::MklAmd,
        Blocking {
            block: 192,
            halves: Halves::FloorWithTail,
            // Exact against peft up to 1024 on the wide products tried, but the thread split
            // that Intel's MKL makes above 768 was never looked for on AMD: promise 512.
            verified_rank: 512,
            verified_min_dims: (4, 12),
            verified_min_dims_batched: (4, 12),
        },
    ),
    (
        ReductionOrder::MklIntelAvx512,
        Blocking {
            block: 384,
            halves: Halves::CeilFirst,
            verified_rank: 768,
            verified_min_dims: (2, 2),
            verified_min_dims_batched: (4, 12),
        },
    ),
];

/// Distance from peft, in units in the last place of the largest element of the merged tensor,
/// that a product outside its order's verified domain is allowed (and, measured on the fixtures
/// of every host tried, stays within): a different summation order moves each element of
/// `B @ A` by a few ulp of its magnitude, and the base weight dominates the sum.
pub const UNVERIFIED_BOUND_ULP: u32 = 4;

impl ReductionOrder {
    /// Every order, for listing and parsing.
    pub const ALL: [ReductionOrder; 2] = [ReductionOrder::MklAmd, ReductionOrder::MklIntelAvx512];

    /// The name used by `PEFTKIT_REDUCTION_ORDER` and the merge summary.
    pub fn name(self) -> &'static str {
        match self {
            ReductionOrder::MklAmd => "mkl-amd",
            ReductionOrder::MklIntelAvx512 => "mkl-intel-avx512",
        }
    }

    /// The order with this [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.name() == name)
    }

    /// This order's blocking.
    pub fn blocking(self) -> Blocking {
        BLOCKINGS
            .iter()
            .find(|(o, _)| *o == self)
            .map(|(_, b)| *b)
            .expect("every order has a blocking")
    }

    /// Splits the rank `k` into the blocks this order sums separately.
    ///
    /// ```
    /// use peftkit_merge::ReductionOrder;
    /// assert_eq!(ReductionOrder::MklAmd.k_blocks(193), vec![0..96, 96..192, 192..193]);
    /// assert_eq!(ReductionOrder::MklIntelAvx512.k_blocks(385), vec![0..193, 193..385]);
    /// ```
    pub fn k_blocks(self, k: usize) -> Vec<Range<usize>> {
        let b = self.blocking();
        if k <= b.block {
            return std::iter::once(0..k).collect();
        }
        if k <= 2 * b.block {
            return match b.halves {
                Halves::FloorWithTail => {
                    let h = k / 2;
                    let mut v = vec![0..h, h..2 * h];
                    if k % 2 == 1 {
                        v.push(2 * h..k);
                    }
                    v
                }
                Halves::CeilFirst => {
                    let h = k.div_ceil(2);
                    vec![0..h, h..k]
                }
            };
        }
        (0..k)
            .step_by(b.block)
            .map(|s| s..(s + b.block).min(k))
            .collect()
    }

    /// Whether this order was measured to equal MKL's for a product of `rows × k` by `k × cols`
    /// (for a LoRA delta: `out_features`, the rank, `in_features`).
    pub fn verified(self, rows: usize, k: usize, cols: usize) -> bool {
        let b = self.blocking();
        k <= b.verified_rank && rows >= b.verified_min_dims.0 && cols >= b.verified_min_dims.1
    }
}

impl ReductionOrder {
    /// [`Self::verified`] for one product of a batch (MoE experts).
    pub fn verified_batched(self, rows: usize, k: usize, cols: usize) -> bool {
        let (min_rows, min_cols) = self.blocking().verified_min_dims_batched;
        self.verified(rows, k, cols) && rows >= min_rows && cols >= min_cols
    }
}

impl std::fmt::Display for ReductionOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What was detected about this host: its order, and whether that order was measured on a CPU
/// of this family (`false`: an unmeasured CPU, which gets the nearest family's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HostOrder {
    /// The order the merge uses by default.
    pub order: ReductionOrder,
    /// Whether this family of CPU was measured.
    pub measured: bool,
}

/// The host's reduction order, from the CPU vendor and its AVX-512 support (detected once).
pub fn host_order() -> HostOrder {
    static HOST: OnceLock<HostOrder> = OnceLock::new();
    *HOST.get_or_init(detect)
}

impl HostOrder {
    /// The order MKL uses on a CPU of this vendor (CPUID's `GenuineIntel`, `AuthenticAMD`, as
    /// `/proc/cpuinfo` calls it `vendor_id`), with or without AVX-512.
    ///
    /// ```
    /// use peftkit_merge::{HostOrder, ReductionOrder};
    /// assert_eq!(HostOrder::for_cpu("AuthenticAMD", false).order, ReductionOrder::MklAmd);
    /// assert!(!HostOrder::for_cpu("GenuineIntel", false).measured);
    /// ```
    pub fn for_cpu(vendor: &str, avx512: bool) -> HostOrder {
        // MKL dispatches on the vendor first: AMD hosts had the same order with AVX2 and with
        // AVX-512. Intel without AVX-512, and other vendors, were not measured: they get the
        // AMD order (MKL's AVX2 blocking) and are reported as unmeasured.
        let (order, measured) = match (vendor, avx512) {
            ("GenuineIntel", true) => (ReductionOrder::MklIntelAvx512, true),
            ("AuthenticAMD", _) => (ReductionOrder::MklAmd, true),
            _ => (ReductionOrder::MklAmd, false),
        };
        HostOrder { order, measured }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> HostOrder {
    let vendor = cpu_vendor();
    let vendor = std::str::from_utf8(&vendor).unwrap_or("");
    HostOrder::for_cpu(vendor, std::arch::is_x86_feature_detected!("avx512f"))
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> HostOrder {
    HostOrder::for_cpu("", false)
}

/// The 12-byte vendor string of CPUID leaf 0 (`GenuineIntel`, `AuthenticAMD`, …).
#[cfg(target_arch = "x86_64")]
fn cpu_vendor() -> [u8; 12] {
    // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

/// 0: not chosen yet; otherwise 1 + the index of the order in [`ReductionOrder::ALL`].
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// Makes every later merge in this process use `order` (`None`: the host's again). Meant for
/// a program that reproduces another machine's merge, and for tests.
pub fn set_reduction_order(order: Option<ReductionOrder>) {
    let v = order.map_or(0, |o| {
        1 + ReductionOrder::ALL
            .iter()
            .position(|x| *x == o)
            .unwrap_or(0) as u8
    });
    ACTIVE.store(v, Ordering::Relaxed);
}

/// The order merges use now: [`set_reduction_order`]'s, else `PEFTKIT_REDUCTION_ORDER`'s, else
/// the host's.
///
/// # Errors
/// If `PEFTKIT_REDUCTION_ORDER` names no known order.
pub fn reduction_order() -> Result<ReductionOrder, UnknownOrder> {
    match ACTIVE.load(Ordering::Relaxed) {
        0 => env_order().map(|o| o.unwrap_or(host_order().order)),
        i => Ok(ReductionOrder::ALL[usize::from(i - 1)]),
    }
}

/// Whether the order in use was chosen ([`set_reduction_order`] or `PEFTKIT_REDUCTION_ORDER`)
/// rather than detected: a chosen order names the measured host whose merge is reproduced.
pub fn reduction_order_is_chosen() -> bool {
    ACTIVE.load(Ordering::Relaxed) != 0 || matches!(env_order(), Ok(Some(_)))
}

/// `PEFTKIT_REDUCTION_ORDER` names no order peftkit knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PEFTKIT_REDUCTION_ORDER={0:?} is not a known order (known: mkl-amd, mkl-intel-avx512); unset it to use this host's")]
pub struct UnknownOrder(pub String);

fn env_order() -> Result<Option<ReductionOrder>, UnknownOrder> {
    static ENV: OnceLock<Result<Option<ReductionOrder>, UnknownOrder>> = OnceLock::new();
    ENV.get_or_init(|| match std::env::var("PEFTKIT_REDUCTION_ORDER") {
        Ok(v) if !v.is_empty() => ReductionOrder::from_name(&v)
            .map(Some)
            .ok_or(UnknownOrder(v)),
        _ => Ok(None),
    })
    .clone()
}

/// The blocks of rank `k` in the active order (the host's if the environment names none that
/// is valid; [`reduction_order`] reports an invalid one before any merge starts).
pub(crate) fn active_k_blocks(k: usize) -> Vec<Range<usize>> {
    reduction_order().unwrap_or(host_order().order).k_blocks(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn amd_blocks() {
        let o = ReductionOrder::MklAmd;
        assert_eq!(o.k_blocks(8), vec![0..8]);
        assert_eq!(o.k_blocks(192), vec![0..192]);
        assert_eq!(o.k_blocks(193), vec![0..96, 96..192, 192..193]);
        assert_eq!(o.k_blocks(256), vec![0..128, 128..256]);
        assert_eq!(o.k_blocks(384), vec![0..192, 192..384]);
        assert_eq!(o.k_blocks(385), vec![0..192, 192..384, 384..385]);
        assert_eq!(o.k_blocks(512), vec![0..192, 192..384, 384..512]);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn intel_blocks() {
        let o = ReductionOrder::MklIntelAvx512;
        assert_eq!(o.k_blocks(384), vec![0..384]);
        assert_eq!(o.k_blocks(385), vec![0..193, 193..385]);
        assert_eq!(o.k_blocks(512), vec![0..256, 256..512]);
        assert_eq!(o.k_blocks(768), vec![0..384, 384..768]);
        assert_eq!(o.k_blocks(769), vec![0..384, 384..768, 768..769]);
    }

    #[test]
    fn names_round_trip() {
        for o in ReductionOrder::ALL {
            assert_eq!(ReductionOrder::from_name(o.name()), Some(o));
        }
        assert_eq!(ReductionOrder::from_name("openblas"), None);
    }
}
