//! LoRA on any burn module with peft's rules: which linear layers get an adapter (peftkit-peft's
//! targeting: names, regex, `all-linear`, `exclude_modules`, `layers_to_transform`), with
//! which rank, alpha and scaling (`rank_pattern`, `alpha_pattern`, rsLoRA), and how fresh
//! factors are drawn (peft's Kaiming-uniform A or Gaussian A, zero B).
//!
//! Everything is attached by **one** custom [`Reparameterizer`]: burn's own `apply_lora`
//! has one rank and alpha, and calling it a second time re-maps (and freezes) the factors of
//! the first call.

use std::collections::BTreeMap;

use burn::module::{LoraAdapter, Module, ModuleVisitor, Param, Reparameterizer};
use burn::tensor::{Distribution, Tensor, TensorData};
use indexmap::IndexMap;
use peftkit_peft::{
    compress_target_modules, lora_scaling, InitLoraWeights, LoraConfig, PatternResolver,
    TargetMatcher, TargetModules,
};

use crate::error::BurnError;

/// The output head peft leaves out of `all-linear` (its `get_output_embeddings()`).
const OUTPUT_LAYERS: [&str; 2] = ["lm_head", "embed_out"];

/// One adapted module: its rank, alpha and the scale burn multiplies `a @ b` with.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleLora {
    /// The rank.
    pub rank: usize,
    /// alpha (from `lora_alpha` or `alpha_pattern`).
    pub alpha: f64,
    /// `alpha / rank`, or `alpha / √rank` with rsLoRA, as peft computes it.
    pub scale: f64,
}

/// The adapters a module carries and the config peft writes for them.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedLora {
    /// The config as peft saves it (`all-linear` resolved to the layer names).
    pub config: LoraConfig,
    /// Each adapted module (its path without `.weight`), in module order.
    pub modules: IndexMap<String, ModuleLora>,
}

/// A linear layer of a module: its path and burn's weight shape `[in, out]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinearLayer {
    pub d_in: usize,
    pub d_out: usize,
    pub adapted: bool,
}

/// Every `Linear` of a module by path, found through the module's own traversal.
#[derive(Default)]
struct LinearFinder {
    path: Vec<String>,
    containers: Vec<String>,
    found: IndexMap<String, LinearLayer>,
    /// Every module path holding a parameter (peft's `named_modules()`, for target
    /// compression).
    modules: indexmap::IndexSet<String>,
}

impl ModuleVisitor for LinearFinder {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_owned());
        self.containers.push(container_type.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        for depth in 1..self.path.len() {
            self.modules.insert(self.path[..depth].join("."));
        }
        // The factors of an adapted weight come after it: `<module>.weight.lora.a`.
        let n = self.path.len();
        if n > 3 && self.path[n - 2] == "lora" && self.path[n - 3] == "weight" {
            if let Some(layer) = self.found.get_mut(&self.path[..n - 3].join(".")) {
                layer.adapted = true;
            }
            return;
        }
        let is_linear_weight = D == 2
            && self.path.last().is_some_and(|p| p == "weight")
            && self.containers.last().is_some_and(|c| c == "Struct:Linear");
        if !is_linear_weight {
            return;
        }
        let dims = param.lazy_shape();
        let module = self.path[..self.path.len() - 1].join(".");
        self.found.insert(
            module,
            LinearLayer {
                d_in: dims[0],
                d_out: dims[1],
                adapted: false,
            },
        );
    }
}

pub(crate) fn linear_layers<M: Module>(module: &M) -> IndexMap<String, LinearLayer> {
    find_linear(module).found
}

fn find_linear<M: Module>(module: &M) -> LinearFinder {
    let mut finder = LinearFinder::default();
    module.visit(&mut finder);
    finder
}

fn refuse(field: &str, value: impl ToString, reason: &str) -> BurnError {
    BurnError::UnsupportedLora {
        field: field.to_owned(),
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

/// The config fields that change what an adapter computes in ways burn's `W + s·(a @ b)`
/// reparameterization cannot express. `training` adds what only matters while training.
pub(crate) fn check_expressible(c: &LoraConfig, training: bool) -> Result<(), BurnError> {
    if c.use_dora {
        return Err(refuse(
            "use_dora",
            true,
            "DoRA's magnitude vector has no burn reparameterization; use plain LoRA",
        ));
    }
    if c.lora_bias {
        return Err(refuse(
            "lora_bias",
            true,
            "burn's LoRA factors have no bias on B",
        ));
    }
    if c.bias != "none" {
        return Err(refuse(
            "bias",
            &c.bias,
            "trained base biases are not LoRA factors; use \"none\"",
        ));
    }
    if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(refuse(
            "modules_to_save",
            format!("{:?}", c.modules_to_save),
            "full module copies are not LoRA factors",
        ));
    }
    if c.trainable_token_indices.is_some() {
        return Err(refuse(
            "trainable_token_indices",
            "set",
            "trainable tokens are not LoRA factors",
        ));
    }
    if c.target_parameters.is_some() {
        return Err(refuse(
            "target_parameters",
            "set",
            "LoRA on raw parameters (MoE experts) is not supported; target linear modules",
        ));
    }
    if c.fan_in_fan_out {
        return Err(refuse(
            "fan_in_fan_out",
            true,
            "Conv1D weights are not burn Linear layers",
        ));
    }
    if let Some(feature) = c.unsupported_merge_features().first() {
        return Err(refuse(
            feature,
            "set",
            "this LoRA variant computes more than W + s·BA",
        ));
    }
    let init_ok = matches!(&c.init_lora_weights, InitLoraWeights::Bool(true))
        || matches!(&c.init_lora_weights, InitLoraWeights::Method(m) if m.eq_ignore_ascii_case("gaussian"));
    if training && !init_ok {
        return Err(refuse(
            "init_lora_weights",
            format!("{:?}", c.init_lora_weights),
            "only true (Kaiming-uniform A) and \"gaussian\" are implemented",
        ));
    }
    if training && c.lora_dropout.as_f64().is_some_and(|p| p != 0.0) {
        return Err(refuse(
            "lora_dropout",
            &c.lora_dropout,
            "burn's LoRA path has no dropout; set it to 0",
        ));
    }
    Ok(())
}

/// `target_modules` as peft holds it after injection, which is what it saves: `all-linear`
/// becomes the names of every linear layer but the output head, and a list of 20 or more
/// names is compressed to minimal suffixes (peftkit-peft's `compress_target_modules`).
fn resolve_targets(config: &mut LoraConfig, finder: &LinearFinder) -> Result<(), BurnError> {
    let names: Vec<String> = match &config.target_modules {
        Some(t) if t.is_all_linear() => finder
            .found
            .keys()
            .filter(|m| !OUTPUT_LAYERS.contains(&m.as_str()))
            .cloned()
            .collect(),
        Some(TargetModules::Names(names)) => names.clone(),
        _ => return Ok(()),
    };
    let all: Vec<&String> = finder.modules.iter().collect();
    let names = match compress_target_modules(&names, &all)? {
        Some(minimal) => minimal.into_iter().collect(),
        None => names,
    };
    config.target_modules = Some(TargetModules::Names(names));
    Ok(())
}

/// Where a module's factors come from.
enum Factors {
    /// Drawn: A by peft's init (`gaussian`: N(0, 1/r); otherwise Kaiming-uniform with
    /// `a = √5`, i.e. U(±1/√in)), B zero.
    Fresh { gaussian: bool },
    /// Given in burn's layout (`a [in, r]`, `b [r, out]`), e.g. read from a peft adapter.
    Given(Box<(TensorData, TensorData)>),
}

struct Plan {
    rank: usize,
    scale: f64,
    factors: Factors,
}

/// The one reparameterizer: every float parameter frozen, planned linear weights adapted.
struct PeftLora {
    plans: BTreeMap<String, Plan>,
}

impl Reparameterizer for PeftLora {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        let base = param.set_require_grad(false);
        let plan = path
            .strip_suffix(".weight")
            .filter(|_| D == 2)
            .and_then(|m| self.plans.remove(m));
        let Some(plan) = plan else {
            return (base, None);
        };
        let device = base.lazy_device();
        let dims = base.lazy_shape();
        let (d_in, d_out, r) = (dims[0], dims[1], plan.rank);
        let (a, b) = match plan.factors {
            Factors::Fresh { gaussian } => {
                let dist = if gaussian {
                    Distribution::Normal(0.0, 1.0 / r as f64)
                } else {
                    let bound = 1.0 / (d_in as f64).sqrt();
                    Distribution::Uniform(-bound, bound)
                };
                (
                    Tensor::<2>::random([d_in, r], dist, &device),
                    Tensor::<2>::zeros([r, d_out], &device),
                )
            }
            Factors::Given(ab) => (
                Tensor::<2>::from_data(ab.0, &device),
                Tensor::<2>::from_data(ab.1, &device),
            ),
        };
        let adapter = LoraAdapter {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scale: plan.scale,
        };
        (base, Some(adapter))
    }
}

/// peft's scale for one module, in f64 for burn (peft rounds it to f32 when it multiplies).
pub(crate) fn module_lora(
    config: &LoraConfig,
    resolver: &PatternResolver,
    module: &str,
    rank: usize,
) -> Result<ModuleLora, BurnError> {
    let alpha = resolver.alpha_for(module)?;
    let scale =
        lora_scaling(alpha, rank, config.use_rslora, 1.0).map_err(|_| BurnError::Module {
            module: module.to_owned(),
            reason: "rank 0".into(),
        })?;
    Ok(ModuleLora {
        rank,
        alpha,
        scale: f64::from(scale),
    })
}

/// Attaches fresh LoRA adapters to the linear layers of `module` that peft's rules select
/// under `config`, freezing every other parameter. Returns the module and what was applied
/// (needed by [`crate::save_peft_adapter`]). Seed the device (`device.seed(n)`) for
/// reproducible factors.
///
/// Refused, naming the field: DoRA, `lora_bias`, `bias`, `modules_to_save`, trainable tokens,
/// `target_parameters`, `lora_dropout > 0` (burn's LoRA path has no dropout), other
/// initialisations, a module that already carries adapters, and targets that match nothing.
///
/// ```
/// use burn::tensor::Device;
/// use peftkit_burn::{apply_lora, LlamaConfig, LlamaForCausalLM};
/// use peftkit_checkpoint::ModelConfig;
/// use peftkit_peft::LoraConfig;
///
/// let hf = ModelConfig::from_json(r#"{"model_type": "llama", "vocab_size": 32,
///     "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
///     "num_attention_heads": 2}"#).unwrap();
/// let model = LlamaForCausalLM::new(&LlamaConfig::from_hf(&hf).unwrap(), &Device::flex());
/// let (config, _) = LoraConfig::from_json_str(r#"{"peft_type": "LORA", "r": 4,
///     "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1],
///     "rank_pattern": {"v_proj": 2}}"#).unwrap();
/// let (_model, lora) = apply_lora(model, &config).unwrap();
/// assert_eq!(lora.modules.keys().collect::<Vec<_>>(),
///            ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]);
/// assert_eq!(lora.modules["model.layers.1.self_attn.v_proj"].scale, 4.0);
/// ```
pub fn apply_lora<M: Module>(
    module: M,
    config: &LoraConfig,
) -> Result<(M, AppliedLora), BurnError> {
    check_expressible(config, true)?;
    let finder = find_linear(&module);
    let layers = &finder.found;
    refuse_adapted(layers)?;
    let mut config = config.clone();
    resolve_targets(&mut config, &finder)?;
    if config.target_modules.is_none() {
        return Err(refuse(
            "target_modules",
            "null",
            "name the layers to adapt (or \"all-linear\")",
        ));
    }
    let matcher = TargetMatcher::for_lora(&config)?;
    let resolver = PatternResolver::new(&config)?;
    let gaussian = matches!(&config.init_lora_weights, InitLoraWeights::Method(_));
    let (mut modules, mut plans) = (IndexMap::new(), BTreeMap::new());
    for name in layers.keys() {
        if !matcher.is_target(name)? {
            continue;
        }
        let rank = resolver.rank_for(name)? as usize;
        let m = module_lora(&config, &resolver, name, rank)?;
        let factors = Factors::Fresh { gaussian };
        plans.insert(
            name.clone(),
            Plan {
                rank,
                scale: m.scale,
                factors,
            },
        );
        modules.insert(name.clone(), m);
    }
    if modules.is_empty() {
        return Err(refuse(
            "target_modules",
            format!("{:?}", config.target_modules),
            "matches no linear layer of the module",
        ));
    }
    let module = module.apply_reparameterization(PeftLora { plans });
    Ok((module, AppliedLora { config, modules }))
}

fn refuse_adapted(layers: &IndexMap<String, LinearLayer>) -> Result<(), BurnError> {
    match layers.iter().find(|(_, l)| l.adapted) {
        Some((name, _)) => Err(BurnError::Module {
            module: name.clone(),
            reason: "already carries a LoRA adapter: apply adapters once, to the plain model"
                .into(),
        }),
        None => Ok(()),
    }
}

/// Attaches given factors (burn layout) to `module`: the import half of
/// [`crate::load_peft_adapter`]. `factors` are checked against the layers by the caller.
pub(crate) fn attach_factors<M: Module>(
    module: M,
    layers: &IndexMap<String, LinearLayer>,
    factors: Vec<(String, ModuleLora, TensorData, TensorData)>,
) -> Result<M, BurnError> {
    refuse_adapted(layers)?;
    let plans = factors
        .into_iter()
        .map(|(name, m, a, b)| {
            let plan = Plan {
                rank: m.rank,
                scale: m.scale,
                factors: Factors::Given(Box::new((a, b))),
            };
            (name, plan)
        })
        .collect();
    Ok(module.apply_reparameterization(PeftLora { plans }))
}
