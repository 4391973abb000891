//! Which vector instruction sets the kernels may use: what the CPU has, less what
//! `PEFTKIT_FORCE_ISA` withholds.
//!
//! `PEFTKIT_FORCE_ISA=avx2` makes an AVX-512 host run the AVX2 kernels, and
//! `PEFTKIT_FORCE_ISA=portable` the portable ones, so that one machine can benchmark the paths
//! of another (`benches/run_all.sh` uses it). Every path gives the same bits, so the switch
//! changes only the speed; the reduction order ([`super::order`]) is MKL's on this host either
//! way. The variable is read once, at first use; an unknown value is ignored with a warning.

use std::sync::OnceLock;

/// The widest instruction set a kernel may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Scalar code (with libm's `fmaf` where the CPU has no FMA).
    Portable,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL (and everything AVX2 has).
    Avx512,
}

/// The instruction set the kernels use in this process.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("PEFTKIT_FORCE_ISA")
            .ok()
            .and_then(|v| match parse(&v) {
                Some(isa) => Some(isa),
                None => {
                    eprintln!(
                        "warning: PEFTKIT_FORCE_ISA={v:?} is not avx512, avx2 or portable; ignored"
                    );
                    None
                }
            });
        detected().min(cap.unwrap_or(Isa::Avx512))
    })
}

/// The `PEFTKIT_FORCE_ISA` value for an instruction set (empty: no limit).
fn parse(v: &str) -> Option<Isa> {
    match v.trim() {
        "" | "avx512" => Some(Isa::Avx512),
        "avx2" => Some(Isa::Avx2),
        "portable" => Some(Isa::Portable),
        _ => None,
    }
}

/// What this CPU supports.
fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_do_not() {
        assert_eq!(parse("avx2"), Some(Isa::Avx2));
        assert_eq!(parse(" portable "), Some(Isa::Portable));
        assert_eq!(parse(""), Some(Isa::Avx512));
        assert_eq!(parse("sse9"), None);
        assert!(isa() <= detected());
    }
}
