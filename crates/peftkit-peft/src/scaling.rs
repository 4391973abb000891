//! LoRA scaling: the one home of the factor peft multiplies every delta with. The merge
//! kernels and planners (`peftkit-merge` re-exports [`lora_scaling`] under the same name),
//! [`PatternResolver::scaling_for`](crate::PatternResolver::scaling_for) and the adapter
//! summaries all call it, so they cannot drift apart by a bit.

/// Why [`lora_scaling`] has no value: a rank of 0 (peft divides by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the LoRA rank must be positive")]
pub struct ZeroRank;

/// peft's `scaling` as the f32 that torch multiplies with, times a merge weight.
///
/// peft computes `alpha / r` (or `alpha / sqrt(r)` with rsLoRA; LoHa and LoKr use `alpha / r`)
/// as a Python float (f64); a merge weight `w` (`peftkit merge --adapter DIR:W`, peft's
/// `rescale_adapter_scale(model, w)` / `LoraLayer.scale_layer(w)`) multiplies that f64; torch
/// then converts the scalar to the tensor's f32 op-math type. Dividing or weighting in f32
/// would differ (e.g. `32/6 · 0.6` is `3.2` this way, `3.2000003` in f32). With `weight` 1.0
/// the product is exact, so the unweighted scale is `alpha / r` rounded once.
///
/// ```
/// use peftkit_peft::lora_scaling;
///
/// assert_eq!(lora_scaling(16.0, 8, false, 1.0)?, 2.0);
/// assert_eq!(lora_scaling(16.0, 4, true, 1.0)?, 8.0); // rsLoRA: alpha / sqrt(r)
/// assert_eq!(lora_scaling(32.0, 6, false, 0.6)?, 3.2); // weighted in f64, rounded once
/// assert!(lora_scaling(16.0, 0, false, 1.0).is_err());
/// # Ok::<(), peftkit_peft::ZeroRank>(())
/// ```
pub fn lora_scaling(alpha: f64, r: usize, use_rslora: bool, weight: f64) -> Result<f32, ZeroRank> {
    if r == 0 {
        return Err(ZeroRank);
    }
    let r = r as f64;
    let s = if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    };
    Ok((s * weight) as f32)
}
