//! The Linear weights peftkit transposes itself ([`crate::layout`]), and burn-store's
//! PyTorch adapters for everything else (normalization renames, any Linear weight not in the
//! set), so that each weight is transposed exactly once.

use std::collections::HashSet;
use std::sync::Arc;

use burn::module::Module;
use burn_store::burn_pack::Tensor as PackTensor;
use burn_store::{BurnToPyTorchAdapter, ModuleAdapter, ModuleContext, PyTorchToBurnAdapter};

use crate::lora::linear_layers;

/// The paths of the module's Linear weights (`<layer>.weight`), found by the module's own
/// traversal with burn-store's rule: a 2-D `weight` of a `Linear`.
pub(crate) fn linear_weights<M: Module>(module: &M) -> Arc<HashSet<String>> {
    let layers = linear_layers(module);
    Arc::new(layers.keys().map(|l| format!("{l}.weight")).collect())
}

/// burn-store's PyTorch adapter of one direction, except for the tensors in `own`, which
/// arrive already laid out and pass through untouched.
#[derive(Clone)]
pub(crate) struct TorchLayout {
    inner: Box<dyn ModuleAdapter>,
    own: Arc<HashSet<String>>,
}

impl TorchLayout {
    /// Loading: torch's `[out, in]` to burn's `[in, out]`.
    pub(crate) fn to_burn(own: Arc<HashSet<String>>) -> Self {
        TorchLayout {
            inner: Box::new(PyTorchToBurnAdapter),
            own,
        }
    }

    /// Saving: burn's `[in, out]` to torch's `[out, in]`.
    pub(crate) fn to_torch(own: Arc<HashSet<String>>) -> Self {
        TorchLayout {
            inner: Box::new(BurnToPyTorchAdapter),
            own,
        }
    }
}

impl ModuleAdapter for TorchLayout {
    fn adapt(&self, tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
        if self.own.contains(&tensor.name) {
            return tensor;
        }
        self.inner.adapt(tensor, ctx)
    }

    fn get_alternative_param_name(&self, param_name: &str, module_type: &str) -> Option<String> {
        self.inner
            .get_alternative_param_name(param_name, module_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}
