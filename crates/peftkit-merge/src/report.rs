//! What a merge did: [`MergeSummary`], and the numerics it used.

use serde::Serialize;

use crate::kernels::{
    host_order, reduction_order_is_chosen, Numerics, ReductionOrder, UNVERIFIED_BOUND_ULP,
};
use crate::plan::MergePlan;

/// What a merge did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MergeSummary {
    /// Base tensors changed by an adapter.
    pub tensors_merged: usize,
    /// Base tensors replaced whole (`modules_to_save`, saved embeddings).
    pub tensors_replaced: usize,
    /// Base tensors copied unchanged.
    pub tensors_copied: usize,
    /// Tensors added (an untied `lm_head`).
    pub tensors_added: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Weight files written.
    pub files: Vec<String>,
    /// Whether `tie_word_embeddings` was set to false.
    pub untied_embeddings: bool,
    /// How the merged floats were computed.
    pub numerics: NumericsReport,
    /// What the merge did with a quantized base (`None` for an unquantized one).
    pub quantization: Option<QuantizationReport>,
    /// Wall time.
    pub seconds: f64,
}

/// What a merge into a quantized base wrote (`quantization` in `merge --json`, see
/// docs/cli.md): one shape for every method [`MergeJob`](crate::MergeJob) writes into.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuantizationReport {
    /// The base's `quant_method`: `"fp8"` or `"bitsandbytes"`.
    pub method: String,
    /// `"kept"`: merged weights re-quantized into the base's format, `quantization_config`
    /// kept; `"dequantized"`: every quantized weight written unquantized,
    /// `quantization_config` dropped; `"qlora-base"` (bitsandbytes): a 16-bit base, merged into
    /// the 4-bit round trip of each adapted weight, written 16-bit.
    pub output: String,
    /// The element format: `"e4m3"` (fp8), `"nf4"`, `"fp4"` or `"int8"` (bitsandbytes; for a
    /// 4-bit base, that of its first 4-bit weight).
    pub format: String,
    /// Whether the block scales are themselves quantized (bitsandbytes' double quantization).
    pub double_quant: bool,
    /// The dtype weights are dequantized to for the merge: fp8 and int8 `--dequantize`, the
    /// model dtype (`"bfloat16"`, …); a kept int8 merge, `"float32"` (peft adds the delta to the
    /// `f32` dequantization); `None` where each weight keeps its own (bitsandbytes 4-bit).
    pub dtype: Option<String>,
    /// Quantized weights written unquantized (`"dequantized"`; 0 otherwise).
    pub tensors_dequantized: usize,
    /// Every merged weight re-quantized (`"kept"`), or rounded through 4 bits
    /// (`"qlora-base"`), with its error where measured.
    pub requantized: Vec<RequantizedTensor>,
}

/// One re-quantized weight.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RequantizedTensor {
    /// The weight.
    pub tensor: String,
    /// `max |dequantize(requantize(w)) - w|` over its elements, `w` being the merged weight
    /// (fp8: in the model dtype; bitsandbytes int8: peft's `f32` sum), `null` in JSON if an
    /// element is NaN. `None` for bitsandbytes 4-bit, whose re-quantization peftkit
    /// reproduces as peft runs it without measuring it.
    pub max_abs_error: Option<f64>,
}

/// The reduction order a merge used, and which tensors it could not promise bit for bit.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NumericsReport {
    /// `peft` (peft's arithmetic on this host) or `exact` (correctly rounded, the same bytes on
    /// every host).
    pub mode: Numerics,
    /// MKL's order reproduced for `B @ A` (the host's, unless overridden; unused by `exact`).
    pub reduction_order: ReductionOrder,
    /// Whether the order in use was measured against peft: this host's CPU family was measured,
    /// or the order was chosen (`PEFTKIT_REDUCTION_ORDER`) to reproduce a measured host. If
    /// not, the nearest family's order is used and every product tensor is unverified.
    pub host_measured: bool,
    /// Base tensors whose delta includes a product outside the order's verified domain (tiny
    /// or very high-rank products, batched expert products narrower than 12, convolutions
    /// wider than 1x1): they agree with peft on this host to [`Self::unverified_bound_ulp`].
    pub unverified_tensors: Vec<String>,
    /// The bound for those, in units in the last place of the tensor's largest element.
    pub unverified_bound_ulp: u32,
}

impl NumericsReport {
    /// The report of `plan` merged with `mode`, `order` being the host's reduction order.
    pub(crate) fn of(plan: &MergePlan, order: ReductionOrder, mode: Numerics) -> Self {
        // A chosen order reproduces a measured host's merge; a detected one is only as good as
        // the measurement of this host's CPU family.
        Self::on_host(
            plan,
            order,
            mode,
            host_order().measured || reduction_order_is_chosen(),
        )
    }

    /// [`Self::of`] on a host whose CPU family was (`measured`) or was not measured.
    fn on_host(plan: &MergePlan, order: ReductionOrder, mode: Numerics, measured: bool) -> Self {
        // Exact numerics do not depend on the host: nothing is left unverified. On a CPU family
        // never measured, no product is promised bit for bit (MKL's AVX2 path on Intel, for
        // one, does not even sum small ranks in order).
        let unverified =
            |e: &crate::edit::Edit| e.unverified(order) || (!measured && e.has_product());
        let unverified_tensors = match mode {
            Numerics::Exact => vec![],
            Numerics::Peft => plan
                .steps
                .iter()
                .filter(|(_, steps)| steps.iter().any(|s| unverified(&s.edit)))
                .map(|(name, _)| name.clone())
                .collect(),
        };
        NumericsReport {
            mode,
            reduction_order: order,
            host_measured: measured,
            unverified_tensors,
            unverified_bound_ulp: UNVERIFIED_BOUND_ULP,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use peftkit_checkpoint::Checkpoint;
    use peftkit_peft::Adapter;

    use super::*;

    /// The plan of the lora_basic fixture (LoRA on q_proj and v_proj of a tiny Llama).
    fn lora_basic_plan() -> MergePlan {
        let case =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft/lora_basic");
        let base = Checkpoint::open(&case.join("base")).unwrap();
        let adapter = Adapter::open(&case.join("adapter")).unwrap();
        crate::plan::plan(&base, None, &[(adapter, 1.0)]).unwrap()
    }

    #[test]
    fn an_unmeasured_host_promises_no_product() {
        let plan = lora_basic_plan();
        let with_products: Vec<String> = plan
            .steps
            .iter()
            .filter(|(_, steps)| steps.iter().any(|s| s.edit.has_product()))
            .map(|(name, _)| name.clone())
            .collect();
        assert!(!with_products.is_empty());
        let order = ReductionOrder::MklAmd;
        let measured = NumericsReport::on_host(&plan, order, Numerics::Peft, true);
        assert_eq!(measured.unverified_tensors, Vec::<String>::new());
        let unmeasured = NumericsReport::on_host(&plan, order, Numerics::Peft, false);
        assert_eq!(unmeasured.unverified_tensors, with_products);
        assert!(!unmeasured.host_measured);
        // Exact numerics are host-independent either way.
        let exact = NumericsReport::on_host(&plan, order, Numerics::Exact, false);
        assert!(exact.unverified_tensors.is_empty());
    }
}
