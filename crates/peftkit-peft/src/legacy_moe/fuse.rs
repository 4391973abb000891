//! The tensors: per-expert LoRA pairs fused into the v5 parameters, other LoRA keys renamed.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use peftkit_checkpoint::{dtype_name, dtype_size};
use peftkit_checkpoint::{CheckpointError, Dtype, StateDict, Tensor};
use peftkit_remap::{RemapError, Revert};

use indexmap::IndexMap;

use crate::adapter::{Adapter, AdapterEntry, AdapterModule};
use crate::config::LoraConfig;
use crate::config::ADAPTER_CONFIG_NAME;

use super::*;

/// Converts `adapter` with `rules` (see the module documentation for the layout).
pub fn convert_with_rules(
    adapter: &Adapter,
    rules: &LegacyMoeRules,
    options: &ConvertOptions,
) -> Result<Converted, ConvertError> {
    let config_file = adapter.dir.join(ADAPTER_CONFIG_NAME);
    let mut config = adapter.config.clone();
    let Some(lora) = config.as_lora_mut() else {
        return Err(ConvertError::NotLora {
            file: config_file,
            peft_type: adapter.config.peft_type().to_owned(),
        });
    };
    let modules = adapter.tensors.modules();
    let leaves: BTreeSet<String> = modules
        .keys()
        .filter_map(|m| m.rsplit('.').next().map(str::to_owned))
        .collect();
    rewrite_config(lora, rules, &leaves, options, &config_file)?;
    let lora = lora.clone();

    let cx = Cx {
        adapter,
        rules,
        options,
        lora: &lora,
        modules: &modules,
        probe_key: HashMap::new(),
    };
    let (cx, forward) = cx.forward_probe()?;
    let (groups, consumed) = cx.group_experts(&forward)?;

    let mut out = Output::default();
    // Keys without `.lora_` first, untouched, as peft's output dict has them first.
    let module_of = lora_keys_by_module(&modules);
    for (key, t) in adapter.weights.tensors() {
        if !module_of.contains_key(key) {
            out.state.insert(key.to_owned(), t.clone());
        }
    }
    cx.rename_unfused(&consumed, &mut out)?;
    // The fused parameters, nested as peft nests its parameter wrappers.
    for g in &groups {
        cx.fuse_group(g, &mut out)?;
    }
    Ok(Converted {
        config,
        state: out.state,
        fused: out.fused,
        dropped: out.dropped,
    })
}

/// What the conversion has produced so far.
#[derive(Default)]
struct Output {
    state: StateDict,
    fused: Vec<String>,
    dropped: Vec<String>,
}

/// Which module each LoRA key belongs to. Only keys with `.lora_` are converted, as in peft;
/// everything else passes through.
fn lora_keys_by_module<'a>(
    modules: &IndexMap<&'a str, AdapterModule<'a>>,
) -> HashMap<&'a str, &'a str> {
    let mut module_of: HashMap<&str, &str> = HashMap::new();
    for (path, m) in modules {
        for (_, t) in m.entries() {
            if t.source_key.contains(".lora_") {
                module_of.insert(t.source_key.as_str(), *path);
            }
        }
    }
    module_of
}

/// The conversion's inputs, and the errors that name the file a key came from.
struct Cx<'a> {
    adapter: &'a Adapter,
    rules: &'a LegacyMoeRules,
    options: &'a ConvertOptions,
    /// The rewritten config.
    lora: &'a LoraConfig,
    /// The adapter's modules by path, built once.
    modules: &'a IndexMap<&'a str, AdapterModule<'a>>,
    /// Probe name (`<module>.weight`) -> the adapter key of its `lora_A`.
    probe_key: HashMap<String, String>,
}

impl Cx<'_> {
    fn file_of(&self, key: &str) -> PathBuf {
        self.adapter
            .weights
            .file_of(key)
            .map(Path::to_owned)
            .unwrap_or_else(|| self.adapter.dir.clone())
    }

    fn remap_err(&self, key: &str, source: RemapError) -> ConvertError {
        ConvertError::Remap {
            file: self.file_of(key),
            source,
        }
    }

    fn tensor_err(&self, key: &str, reason: String) -> ConvertError {
        ConvertError::Tensor {
            file: self.file_of(key),
            tensor: key.to_owned(),
            reason,
        }
    }

    fn untargeted(&self, key: &str, module: &str, why: String) -> ConvertError {
        ConvertError::Untargeted {
            file: self.file_of(key),
            tensor: key.to_owned(),
            module: module.to_owned(),
            why,
        }
    }

    /// The file key of `module`'s tensor of `role` (for messages).
    fn key_of(&self, module: &str, role: &str) -> String {
        self.modules
            .get(module)
            .and_then(|m| m.entry(role))
            .map(|t| t.source_key.clone())
            .unwrap_or_else(|| format!("{module} ({role})"))
    }

    fn first_key(&self, name: &str) -> String {
        self.probe_key.get(name).cloned().unwrap_or_default()
    }

    /// The A tensors named like the base weights they adapt, run through the table: its
    /// converters group them exactly as they group the per-expert base weights.
    fn forward_probe(mut self) -> Result<(Self, peftkit_remap::Forward), ConvertError> {
        let mut probe = StateDict::new();
        for (path, m) in self.modules {
            if let Some(a) = m.entry("a") {
                if a.source_key.contains(".lora_") {
                    probe.insert(format!("{path}.weight"), a.tensor.clone());
                    self.probe_key
                        .insert(format!("{path}.weight"), a.source_key.clone());
                }
            }
        }
        let forward = self.rules.mapping.forward(&probe).map_err(|e| {
            let key = match &e {
                RemapError::Tensor { tensor, .. } => self.first_key(tensor),
                _ => String::new(),
            };
            self.remap_err(&key, e)
        })?;
        Ok((self, forward))
    }

    /// The fused parameters of the probe's output, each with its per-expert pairs, and the
    /// modules they consume.
    fn group_experts(
        &self,
        forward: &peftkit_remap::Forward,
    ) -> Result<(Vec<Group>, BTreeSet<String>), ConvertError> {
        let mut groups: Vec<Group> = Vec::new();
        let mut consumed: BTreeSet<String> = BTreeSet::new();
        for (name, t) in &forward.state {
            let pieces = match self
                .rules
                .mapping
                .fused_pieces(name, t.shape(), &Revert::FromConfig)
            {
                Ok(p) => p,
                Err(RemapError::NotFused { .. }) => continue,
                Err(e) => return Err(self.remap_err("", e)),
            };
            let Some((container, param)) = name.rsplit_once('.') else {
                continue;
            };
            if self.rules.fused_param(param).is_none() || pieces.iter().any(|p| p.expert.is_none())
            {
                continue;
            }
            let parts = self.place_pieces(name, t.shape(), &pieces, &mut consumed)?;
            groups.push(Group {
                v5_name: name.clone(),
                container: container.to_owned(),
                param: param.to_owned(),
                parts,
            });
        }
        Ok((groups, consumed))
    }

    /// `parts[p][e]` of fused parameter `name`: every piece in its slot, all slots filled.
    fn place_pieces(
        &self,
        name: &str,
        shape: &[usize],
        pieces: &[peftkit_remap::FusedPiece],
        consumed: &mut BTreeSet<String>,
    ) -> Result<Vec<Vec<Piece>>, ConvertError> {
        // Parts are told apart by where their rows sit in the fused tensor.
        let mut starts: Vec<usize> = pieces
            .iter()
            .filter_map(|p| p.region.get(1).map(|r| r.start))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        let experts = shape.first().copied().unwrap_or(0);
        let mut parts: Vec<Vec<Option<Piece>>> = (0..starts.len())
            .map(|_| (0..experts).map(|_| None).collect())
            .collect();
        for piece in pieces {
            let module = piece
                .original_name
                .strip_suffix(".weight")
                .unwrap_or(&piece.original_name)
                .to_owned();
            let key = self.first_key(&piece.original_name);
            let Some(m) = self.modules.get(module.as_str()) else {
                return Err(self.tensor_err(
                    &key,
                    format!("the table places `{module}` in `{name}`, but the adapter has no such module"),
                ));
            };
            if let Some((role, extra)) = m.entries().find(|(r, _)| *r != "a" && *r != "b") {
                return Err(self.tensor_err(
                    &extra.source_key,
                    format!("role `{role}` of an expert module cannot be fused (peft's fused experts hold only lora_A and lora_B)"),
                ));
            }
            let (Some(a), Some(b)) = (m.get("a"), m.get("b")) else {
                return Err(
                    self.tensor_err(&key, "an expert module needs both lora_A and lora_B".into())
                );
            };
            let p = piece
                .region
                .get(1)
                .and_then(|r| starts.iter().position(|s| *s == r.start));
            let e = piece.expert.map(|(_, e)| e);
            let slot = p
                .zip(e)
                .and_then(|(p, e)| parts.get_mut(p).and_then(|v| v.get_mut(e)));
            let Some(slot) = slot else {
                return Err(self.tensor_err(&key, format!("no place in `{name}`")));
            };
            *slot = Some(Piece {
                module: module.clone(),
                a: a.clone(),
                b: b.clone(),
            });
            consumed.insert(module);
        }
        let mut complete = Vec::new();
        for part in parts {
            let v: Option<Vec<Piece>> = part.into_iter().collect();
            let Some(v) = v else {
                return Err(self.tensor_err(
                    &self.first_key(&pieces[0].original_name),
                    format!("`{name}` misses an expert's LoRA pair"),
                ));
            };
            complete.push(v);
        }
        Ok(complete)
    }

    /// LoRA keys of modules that are not fused: renamed as the table renames their module.
    fn rename_unfused(
        &self,
        consumed: &BTreeSet<String>,
        out: &mut Output,
    ) -> Result<(), ConvertError> {
        for (path, m) in self.modules {
            if consumed.contains(*path) {
                continue;
            }
            let lora_tensors: Vec<&AdapterEntry> = m
                .entries()
                .map(|(_, t)| t)
                .filter(|t| t.source_key.contains(".lora_"))
                .collect();
            let Some(first) = lora_tensors.first() else {
                continue;
            };
            let new_path = self.renamed_module(path, first)?;
            if !targets_module(self.lora, &new_path) {
                match self.options.untargeted {
                    Untargeted::Error => {
                        return Err(self.untargeted(
                            &first.source_key,
                            &new_path,
                            "no target_modules entry or target_parameters entry matches it".into(),
                        ))
                    }
                    Untargeted::Drop => {
                        out.dropped
                            .extend(lora_tensors.iter().map(|t| t.source_key.clone()));
                        continue;
                    }
                }
            }
            for t in lora_tensors {
                let suffix =
                    disk_suffix(&t.source_key, path, &self.adapter.name).ok_or_else(|| {
                        self.tensor_err(
                            &t.source_key,
                            format!("the key does not start with its module `{path}`"),
                        )
                    })?;
                out.state.insert(
                    format!("{MODEL_PREFIX}{new_path}.{suffix}"),
                    t.tensor.clone(),
                );
            }
        }
        Ok(())
    }

    /// The v5 name of module `path`, as the table renames it.
    fn renamed_module(&self, path: &str, first: &AdapterEntry) -> Result<String, ConvertError> {
        let mut single = StateDict::new();
        single.insert(format!("{path}.weight"), first.tensor.clone());
        let renamed = self
            .rules
            .mapping
            .forward(&single)
            .map_err(|e| self.remap_err(&first.source_key, e))?;
        match renamed
            .state
            .keys()
            .next()
            .map(|k| k.strip_suffix(".weight"))
        {
            Some(Some(p)) if renamed.state.len() == 1 => Ok(p.to_owned()),
            _ => Err(self.tensor_err(
                &first.source_key,
                format!("the conversion table does not map module `{path}` to one module"),
            )),
        }
    }

    /// Writes the fused A and B of group `g` under the key of its wrapper, or drops the group
    /// when its parameter is no longer targeted.
    fn fuse_group(&self, g: &Group, out: &mut Output) -> Result<(), ConvertError> {
        let first = &g.parts[0][0];
        let group_key = self.first_key(&format!("{}.weight", first.module));
        let targeted: Vec<&str> = self
            .rules
            .fused
            .iter()
            .map(|f| f.name.as_str())
            .filter(|f| targets_param(self.lora, &format!("{}.{f}", g.container)))
            .collect();
        let Some(index) = targeted.iter().position(|f| *f == g.param) else {
            return match self.options.untargeted {
                Untargeted::Error => Err(self.untargeted(
                    &group_key,
                    &g.v5_name,
                    format!(
                        "no target_parameters entry matches the fused parameter `{}`",
                        g.param
                    ),
                )),
                Untargeted::Drop => {
                    for piece in g.parts.iter().flatten() {
                        if let Some(m) = self.modules.get(piece.module.as_str()) {
                            out.dropped
                                .extend(m.entries().map(|(_, t)| t.source_key.clone()));
                        }
                    }
                    Ok(())
                }
            };
        };
        let depth = targeted.len() - 1 - index;
        let prefix = format!(
            "{MODEL_PREFIX}{}{}",
            g.container,
            ".base_layer".repeat(depth)
        );
        let (a_key, b_key) = (
            format!("{prefix}.lora_A.weight"),
            format!("{prefix}.lora_B.weight"),
        );
        let dtype = first.a.dtype();
        let elt = dtype_size(dtype).ok_or_else(|| {
            self.tensor_err(
                &group_key,
                format!("{} has no whole-byte element size", dtype_name(dtype)),
            )
        })?;
        let experts = g.parts[0].len();
        let layout = self.part_layout(g, dtype)?;
        let a = fused_a(
            a_key.clone(),
            &g.parts,
            dtype,
            vec![experts * layout.rank, layout.in_features],
        )?;
        let b = fused_b(
            b_key.clone(),
            &g.parts,
            dtype,
            elt,
            layout.rows,
            layout.ranks,
        )?;
        out.state.insert(a_key.clone(), a);
        out.state.insert(b_key.clone(), b);
        out.fused.push(a_key);
        out.fused.push(b_key);
        Ok(())
    }

    /// Where each part's rows and ranks sit in the fused B, after checking that every expert's
    /// pair has the part's shapes and the group's dtype.
    fn part_layout(&self, g: &Group, dtype: Dtype) -> Result<PartLayout, ConvertError> {
        let mut layout = PartLayout::default();
        let mut ooff = 0usize;
        let mut in_features = None;
        for part in &g.parts {
            let p0 = &part[0];
            let key0 = self.key_of(&p0.module, "a");
            let (rank, fin) = match p0.a.shape() {
                [r, i] => (*r, *i),
                s => {
                    return Err(
                        self.tensor_err(&key0, format!("lora_A has shape {s:?}; 2 dims expected"))
                    )
                }
            };
            let nout = match p0.b.shape() {
                [o, r] if *r == rank => *o,
                s => {
                    return Err(self.tensor_err(
                        &self.key_of(&p0.module, "b"),
                        format!("lora_B has shape {s:?}; [out, {rank}] expected"),
                    ))
                }
            };
            if *in_features.get_or_insert(fin) != fin {
                return Err(self.tensor_err(
                    &key0,
                    format!(
                        "lora_A has {fin} input features; the other parts of `{}` have {}",
                        g.v5_name,
                        in_features.unwrap_or(fin)
                    ),
                ));
            }
            if g.parts.len() > 1 && rank as u64 != self.lora.r {
                return Err(self.tensor_err(
                    &key0,
                    format!("rank {rank} differs from r = {}: peft gives `{}` rank {}·r, so the fused tensors would not load", self.lora.r, g.param, g.parts.len()),
                ));
            }
            self.check_experts(g, part, dtype)?;
            layout.rows.push((ooff, nout));
            layout.ranks.push((layout.rank, rank));
            ooff += nout;
            layout.rank += rank;
        }
        layout.in_features = in_features.unwrap_or(0);
        Ok(layout)
    }

    /// Every expert's pair of one part has the first expert's shapes and the group's dtype.
    fn check_experts(&self, g: &Group, part: &[Piece], dtype: Dtype) -> Result<(), ConvertError> {
        let p0 = &part[0];
        for piece in part {
            let ka = self.key_of(&piece.module, "a");
            let kb = self.key_of(&piece.module, "b");
            if piece.a.shape() != p0.a.shape() || piece.b.shape() != p0.b.shape() {
                return Err(self.tensor_err(
                    &ka,
                    format!("expert shapes differ: lora_A {:?} / lora_B {:?} here, {:?} / {:?} for `{}`", piece.a.shape(), piece.b.shape(), p0.a.shape(), p0.b.shape(), p0.module),
                ));
            }
            for (t, k) in [(&piece.a, &ka), (&piece.b, &kb)] {
                if t.dtype() != dtype {
                    return Err(self.tensor_err(
                        k,
                        format!(
                            "dtype {} differs from {} of the other tensors fused into `{}`",
                            dtype_name(t.dtype()),
                            dtype_name(dtype),
                            g.v5_name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Where the parts of a fused parameter sit: `rows[p] = (offset, n_out)`, `ranks[p] = (offset,
/// rank)`, and the totals.
#[derive(Default)]
struct PartLayout {
    rows: Vec<(usize, usize)>,
    ranks: Vec<(usize, usize)>,
    /// Sum of the parts' ranks (`R`).
    rank: usize,
    in_features: usize,
}

/// The on-disk suffix of `key` after `module`, without the adapter name (peft's
/// `_convert_to_peft_serialized_keys`): `…q_proj.lora_A.default.weight` -> `lora_A.weight`.
pub(super) fn disk_suffix(key: &str, module: &str, adapter: &str) -> Option<String> {
    let rest = key.strip_prefix(MODEL_PREFIX).unwrap_or(key);
    let suffix = rest.strip_prefix(module)?.strip_prefix('.')?;
    let tail = format!(".{adapter}");
    if let Some(head) = suffix.strip_suffix(&tail) {
        return Some(head.to_owned());
    }
    Some(match suffix.rsplit_once('.') {
        Some((head, last)) => match head.strip_suffix(&tail) {
            Some(h) => format!("{h}.{last}"),
            None => suffix.to_owned(),
        },
        None => suffix.to_owned(),
    })
}

/// One per-expert LoRA pair feeding a fused parameter.
struct Piece {
    module: String,
    a: Tensor,
    b: Tensor,
}

/// A fused parameter of one module: its parts (in concatenation order), each with one pair
/// per expert.
struct Group {
    /// v5 name of the fused parameter (`model.layers.0.mlp.experts.gate_up_proj`).
    v5_name: String,
    /// Its module (`model.layers.0.mlp.experts`).
    container: String,
    /// Its name in the module (`gate_up_proj`).
    param: String,
    /// `parts[p][e]`.
    parts: Vec<Vec<Piece>>,
}

/// The fused A: `A[e·R + koff_p + k] = A_{p,e}[k]` (experts outer, parts, then rank).
fn fused_a(
    key: String,
    parts: &[Vec<Piece>],
    dtype: Dtype,
    shape: Vec<usize>,
) -> Result<Tensor, ConvertError> {
    let experts = parts.first().map_or(0, Vec::len);
    let sources: Vec<Vec<Tensor>> = parts
        .iter()
        .map(|p| p.iter().map(|x| x.a.clone()).collect())
        .collect();
    let name = key.clone();
    let t = Tensor::lazy(dtype, shape, move || {
        let mut out = Vec::new();
        for e in 0..experts {
            for part in &sources {
                let bytes = part[e].bytes().map_err(|err| named(err, &name))?;
                out.extend_from_slice(&bytes);
            }
        }
        Ok(out)
    })?;
    Ok(t)
}

/// The fused B: each expert's block-diagonal `[[B_{0,e}, 0], [0, B_{1,e}]]`, rank-major columns:
/// `B[ooff_p + o, (koff_p + k)·E + e] = B_{p,e}[o, k]`, zero elsewhere.
fn fused_b(
    key: String,
    parts: &[Vec<Piece>],
    dtype: Dtype,
    elt: usize,
    rows: Vec<(usize, usize)>,
    ranks: Vec<(usize, usize)>,
) -> Result<Tensor, ConvertError> {
    let experts = parts.first().map_or(0, Vec::len);
    let total_out: usize = rows.iter().map(|(_, n)| n).sum();
    let total_rank: usize = ranks.iter().map(|(_, n)| n).sum();
    let cols = total_rank * experts;
    let sources: Vec<Vec<Tensor>> = parts
        .iter()
        .map(|p| p.iter().map(|x| x.b.clone()).collect())
        .collect();
    let name = key.clone();
    let t = Tensor::lazy(dtype, vec![total_out, cols], move || {
        let mut out = vec![0u8; total_out * cols * elt];
        for (p, part) in sources.iter().enumerate() {
            let (ooff, nout) = rows[p];
            let (koff, rank) = ranks[p];
            for (e, b) in part.iter().enumerate() {
                let bytes = b.bytes().map_err(|err| named(err, &name))?;
                for o in 0..nout {
                    for k in 0..rank {
                        let src = (o * rank + k) * elt;
                        let dst = ((ooff + o) * cols + (koff + k) * experts + e) * elt;
                        out[dst..dst + elt].copy_from_slice(&bytes[src..src + elt]);
                    }
                }
            }
        }
        Ok(out)
    })?;
    Ok(t)
}

/// Puts the output tensor's name into an error that has none.
fn named(err: CheckpointError, name: &str) -> CheckpointError {
    match err {
        CheckpointError::TensorData { tensor, reason } if tensor.is_empty() => {
            CheckpointError::TensorData {
                tensor: name.to_owned(),
                reason,
            }
        }
        other => other,
    }
}
