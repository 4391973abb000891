//! Running a converter's ops on named groups of tensors, as transformers'
//! `WeightConverter.convert` does, without touching any data.
//!
//! Values flow as transformers' `dict[pattern, list[tensor]]`: an ordered list of
//! `(name, tensors)` entries, named by patterns. Each op follows the naming rules of its
//! transformers counterpart (`MergeModulelist`, `SplitModulelist`, `Concatenate`, `Chunk`,
//! `Split`, `Transpose`), so the outputs come out in transformers' order with its names.
//!
//! Besides the data (a [`Data`] view), each value carries torch's storage metadata
//! ([`Meta`]): which storage it would live in and with which strides. That is what
//! huggingface_hub groups shards by, so reverse outputs that torch would hold as views of one
//! storage can be placed together, exactly as `save_pretrained` places them.

use peftkit_checkpoint::dtype_name;
use peftkit_checkpoint::{Dtype, Tensor};
use serde_json::{Map, Value};

use crate::table::{Op, SizeExpr};
use crate::view::{Base, Concat, Data, View};

/// torch's view of a value: its storage and layout in it.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub(crate) storage: u64,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

impl Meta {
    /// A tensor owning a new contiguous storage.
    pub(crate) fn fresh(shape: &[usize], ids: &mut u64) -> Self {
        *ids += 1;
        Meta {
            storage: *ids,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    /// torch's `is_contiguous`: size-1 dims are ignored.
    fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&size, &stride) in self.shape.iter().zip(&self.strides).rev() {
            if size != 1 {
                if stride != expected {
                    return false;
                }
                expected *= size;
            }
        }
        true
    }

    fn slice(&self, dim: usize, len: usize) -> Self {
        let mut m = self.clone();
        m.shape[dim] = len;
        m
    }

    fn squeeze(&self, dim: usize) -> Self {
        let mut m = self.clone();
        m.shape.remove(dim);
        m.strides.remove(dim);
        m
    }

    fn transpose(&self, a: usize, b: usize) -> Self {
        let mut m = self.clone();
        m.shape.swap(a, b);
        m.strides.swap(a, b);
        m
    }

    /// `.contiguous()`: the same storage when already contiguous, a copy otherwise.
    fn contiguous(self, ids: &mut u64) -> Self {
        if self.is_contiguous() {
            self
        } else {
            Meta::fresh(&self.shape, ids)
        }
    }
}

/// One tensor flowing through a converter.
#[derive(Clone)]
pub(crate) struct Val {
    pub(crate) data: Data,
    pub(crate) dtype: Dtype,
    pub(crate) meta: Meta,
}

impl Val {
    /// All of `t`, owning a new storage.
    pub(crate) fn of_tensor(t: &Tensor, ids: &mut u64) -> Self {
        Val {
            data: Data::View(View::whole(Base::Tensor(t.clone()), t.shape())),
            dtype: t.dtype(),
            meta: Meta::fresh(t.shape(), ids),
        }
    }

    pub(crate) fn shape(&self) -> Vec<usize> {
        self.data.shape()
    }
}

/// Named groups of values, in insertion order.
pub(crate) type Entries = Vec<(String, Vec<Val>)>;

/// What the ops of one converter need besides the values.
pub(crate) struct OpContext<'a> {
    /// Names of the patterns read (transformers' `source_patterns`), written form.
    pub(crate) reads: &'a [String],
    /// Names of the patterns written (`target_patterns`), written form.
    pub(crate) writes: &'a [String],
    /// `config.json`, for sizes given as config fields.
    pub(crate) config: Option<&'a Map<String, Value>>,
    /// Storage id counter.
    pub(crate) ids: &'a mut u64,
}

fn single<'v>(entries: &'v Entries, op: &str) -> Result<&'v Val, String> {
    match entries.as_slice() {
        [(_, vals)] if vals.len() == 1 => Ok(&vals[0]),
        _ => Err(format!(
            "`{op}` takes exactly one tensor, got {}",
            entries.iter().map(|(_, v)| v.len()).sum::<usize>()
        )),
    }
}

fn only_write<'c>(ctx: &'c OpContext<'_>, op: &str) -> Result<&'c String, String> {
    match ctx.writes {
        [w] => Ok(w),
        _ => Err(format!(
            "`{op}` produces one tensor but the rule writes {} patterns",
            ctx.writes.len()
        )),
    }
}

fn check_dim(dim: usize, rank: usize, op: &str, inclusive: bool) -> Result<(), String> {
    let ok = if inclusive { dim <= rank } else { dim < rank };
    if ok {
        Ok(())
    } else {
        Err(format!("`{op}` along dim {dim} of a rank-{rank} tensor"))
    }
}

/// Evaluates a size expression against `config.json`.
pub(crate) fn eval_size(
    expr: &SizeExpr,
    config: Option<&Map<String, Value>>,
) -> Result<usize, String> {
    match expr {
        SizeExpr::Fixed(n) => Ok(*n),
        SizeExpr::Config(text) => {
            let mut product = 1usize;
            for term in text.split('*').map(str::trim) {
                let value = if let Ok(n) = term.parse::<usize>() {
                    n
                } else {
                    let config = config.ok_or_else(|| {
                        format!("size `{text}` needs config.json, which was not given")
                    })?;
                    let mut v: Option<&Value> = None;
                    for (i, part) in term.split('.').enumerate() {
                        v = if i == 0 {
                            config.get(part)
                        } else {
                            v.and_then(|x| x.get(part))
                        };
                    }
                    v.and_then(Value::as_u64)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| {
                            format!(
                                "size `{text}`: config.json has no non-negative integer `{term}`"
                            )
                        })?
                };
                product = product
                    .checked_mul(value)
                    .ok_or_else(|| format!("size `{text}` overflows"))?;
            }
            Ok(product)
        }
    }
}

/// Cuts one value into parts along `dim`, named by the written patterns, each made contiguous
/// (transformers' `Chunk` and `Split` call `.contiguous()` on every part).
fn cut(v: &Val, dim: usize, sizes: &[usize], ctx: &mut OpContext<'_>) -> Result<Entries, String> {
    let view = v.data.view();
    let mut start = 0usize;
    let mut out = Vec::new();
    for (name, &len) in ctx.writes.iter().zip(sizes) {
        let meta = v.meta.slice(dim, len).contiguous(ctx.ids);
        out.push((
            name.clone(),
            vec![Val {
                data: Data::View(view.slice(dim, start, len)),
                dtype: v.dtype,
                meta,
            }],
        ));
        start += len;
    }
    Ok(out)
}

/// Applies one op.
pub(crate) fn apply(op: &Op, entries: Entries, ctx: &mut OpContext<'_>) -> Result<Entries, String> {
    match op {
        Op::Stack { dim } => stack(dim, entries, ctx),
        Op::Unstack { dim } => unstack(dim, entries, ctx),
        Op::Concat { dim, sizes } => concat(dim, sizes, entries, ctx),
        Op::Chunk { dim } => chunk(dim, entries, ctx),
        Op::Split { dim, sizes } => split(dim, sizes, entries, ctx),
        Op::Transpose { dim0, dim1 } => transpose(dim0, dim1, entries, ctx),
    }
}

/// Stacks each entry's list of values along a new dim (`MergeModulelist`).
fn stack(dim: &usize, entries: Entries, ctx: &mut OpContext<'_>) -> Result<Entries, String> {
    let n_entries = entries.len();
    let mut out = Vec::new();
    for (name, vals) in entries {
        let name = if n_entries == 1 {
            only_write(ctx, "stack")?.clone()
        } else {
            name
        };
        let first = vals.first().ok_or("`stack` of an empty list")?;
        let shape = first.shape();
        check_dim(*dim, shape.len(), "stack", true)?;
        for v in &vals {
            if v.shape() != shape || v.dtype != first.dtype {
                return Err(format!(
                    "`stack` needs equal shapes and dtypes: {:?} {} vs {:?} {}",
                    shape,
                    dtype_name(first.dtype),
                    v.shape(),
                    dtype_name(v.dtype)
                ));
            }
        }
        let mut new_shape = shape.clone();
        new_shape.insert(*dim, vals.len());
        let dtype = first.dtype;
        let parts = vals
            .iter()
            .map(|v| Data::View(v.data.view().unsqueeze(*dim)))
            .collect();
        out.push((
            name,
            vec![Val {
                data: Data::Concat(std::sync::Arc::new(Concat {
                    parts,
                    dim: *dim,
                    shape: new_shape.clone(),
                    dtype,
                })),
                dtype,
                meta: Meta::fresh(&new_shape, ctx.ids),
            }],
        ));
    }
    Ok(out)
}

/// One value per index of `dim`, views of the same storage (`SplitModulelist`).
fn unstack(dim: &usize, entries: Entries, ctx: &mut OpContext<'_>) -> Result<Entries, String> {
    let n_entries = entries.len();
    let mut out = Vec::new();
    for (name, vals) in entries {
        let [v] = vals.as_slice() else {
            return Err(format!(
                "`unstack` takes one tensor per pattern, got {}",
                vals.len()
            ));
        };
        let shape = v.shape();
        check_dim(*dim, shape.len(), "unstack", false)?;
        let pattern = if n_entries == 1 {
            only_write(ctx, "unstack")?.clone()
        } else {
            name
        };
        let view = v.data.view();
        for i in 0..shape[*dim] {
            // SplitModulelist: chunk(n) then squeeze, no copy: views of one storage.
            out.push((
                pattern.replace('*', &i.to_string()),
                vec![Val {
                    data: Data::View(view.slice(*dim, i, 1).squeeze(*dim)),
                    dtype: v.dtype,
                    meta: v.meta.slice(*dim, 1).squeeze(*dim),
                }],
            ));
        }
    }
    Ok(out)
}

/// Concatenates every value, in the order of the rule's read patterns (`Concatenate`).
fn concat(
    dim: &usize,
    sizes: &Option<Vec<SizeExpr>>,
    entries: Entries,
    ctx: &mut OpContext<'_>,
) -> Result<Entries, String> {
    let target = only_write(ctx, "concat")?.clone();
    let mut vals: Vec<Val> = Vec::new();
    // transformers walks the source patterns in order (the dict is unordered).
    for read in ctx.reads {
        if let Some((_, v)) = entries.iter().find(|(n, _)| n == read) {
            vals.extend(v.iter().cloned());
        }
    }
    if let Some((n, _)) = entries.iter().find(|(n, _)| !ctx.reads.contains(n)) {
        return Err(format!(
            "`concat` got `{n}`, which is not one of the rule's patterns"
        ));
    }
    let first = vals.first().ok_or("`concat` of nothing")?;
    let shape = first.shape();
    check_dim(*dim, shape.len(), "concat", false)?;
    let mut total = 0usize;
    for v in &vals {
        let s = v.shape();
        let same_rest = s.len() == shape.len()
            && s.iter()
                .zip(&shape)
                .enumerate()
                .all(|(d, (a, b))| d == *dim || a == b);
        if !same_rest || v.dtype != first.dtype {
            return Err(format!(
                "`concat` along dim {dim} needs matching shapes and dtypes: {:?} {} vs {:?} {}",
                shape,
                dtype_name(first.dtype),
                s,
                dtype_name(v.dtype)
            ));
        }
        total += s[*dim];
    }
    let parts: Vec<usize> = vals.iter().map(|v| v.shape()[*dim]).collect();
    if sizes.is_none() && parts.windows(2).any(|w| w[0] != w[1]) {
        // The inverse (an equal chunk) could not give these parts back.
        return Err(format!(
            "`concat` of parts of unequal sizes {parts:?} along dim {dim}: give the rule `sizes` so the inverse can split them back"
        ));
    }
    if let Some(sizes) = sizes {
        let want = sizes
            .iter()
            .map(|s| eval_size(s, ctx.config))
            .collect::<Result<Vec<_>, _>>()?;
        if want != parts {
            return Err(format!(
                "`concat` parts have sizes {parts:?} along dim {dim}, the rule says {want:?}"
            ));
        }
    }
    let mut new_shape = shape.clone();
    new_shape[*dim] = total;
    let dtype = first.dtype;
    Ok(vec![(
        target,
        vec![Val {
            data: Data::Concat(std::sync::Arc::new(Concat {
                parts: vals.iter().map(|v| v.data.clone()).collect(),
                dim: *dim,
                shape: new_shape.clone(),
                dtype,
            })),
            dtype,
            meta: Meta::fresh(&new_shape, ctx.ids),
        }],
    )])
}

/// Equal parts, one per written pattern (`Chunk`).
fn chunk(dim: &usize, entries: Entries, ctx: &mut OpContext<'_>) -> Result<Entries, String> {
    let v = single(&entries, "chunk")?.clone();
    let shape = v.shape();
    check_dim(*dim, shape.len(), "chunk", false)?;
    let n = ctx.writes.len();
    if n == 0 || shape[*dim] % n != 0 {
        return Err(format!(
            "`chunk` of size {} along dim {dim} into {n} equal parts",
            shape[*dim]
        ));
    }
    cut(&v, *dim, &vec![shape[*dim] / n; n], ctx)
}

/// Parts of the given sizes, one per written pattern (`Split`).
fn split(
    dim: &usize,
    sizes: &[SizeExpr],
    entries: Entries,
    ctx: &mut OpContext<'_>,
) -> Result<Entries, String> {
    let v = single(&entries, "split")?.clone();
    let shape = v.shape();
    check_dim(*dim, shape.len(), "split", false)?;
    let sizes = sizes
        .iter()
        .map(|s| eval_size(s, ctx.config))
        .collect::<Result<Vec<_>, _>>()?;
    if sizes.len() != ctx.writes.len() || sizes.iter().sum::<usize>() != shape[*dim] {
        return Err(format!(
            "`split` of size {} along dim {dim} into sizes {sizes:?} for {} patterns",
            shape[*dim],
            ctx.writes.len()
        ));
    }
    cut(&v, *dim, &sizes, ctx)
}

/// Swaps two dims (`Transpose`), made contiguous as transformers does.
fn transpose(
    dim0: &usize,
    dim1: &usize,
    entries: Entries,
    ctx: &mut OpContext<'_>,
) -> Result<Entries, String> {
    let v = single(&entries, "transpose")?.clone();
    let rank = v.shape().len();
    check_dim(*dim0, rank, "transpose", false)?;
    check_dim(*dim1, rank, "transpose", false)?;
    // First op of a one-to-many chain: it keeps the source name (transformers' rule).
    let name = if ctx.writes.len() > 1 {
        match ctx.reads {
            [r] => r.clone(),
            _ => return Err("`transpose` before a split needs a single source pattern".into()),
        }
    } else {
        only_write(ctx, "transpose")?.clone()
    };
    let meta = v.meta.transpose(*dim0, *dim1).contiguous(ctx.ids);
    Ok(vec![(
        name,
        vec![Val {
            data: Data::View(v.data.view().transpose(*dim0, *dim1)),
            dtype: v.dtype,
            meta,
        }],
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_follows_torch() {
        let mut ids = 0;
        let m = Meta::fresh(&[3, 16, 4], &mut ids);
        // chunk along dim 1 of [3, 16, 4]: a strided view, copied by .contiguous()
        assert!(!m.slice(1, 8).is_contiguous());
        // with one expert the same chunk is contiguous: no copy, same storage
        let one = Meta::fresh(&[1, 16, 4], &mut ids);
        assert!(one.slice(1, 8).is_contiguous());
        // chunk along dim 0 is always contiguous
        assert!(m.slice(0, 1).is_contiguous());
        assert!(!m.transpose(1, 2).is_contiguous());
        assert!(Meta::fresh(&[1, 5], &mut ids)
            .transpose(0, 1)
            .is_contiguous());
    }

    #[test]
    fn config_sizes() {
        let cfg: Map<String, Value> =
            serde_json::from_str(r#"{"heads": 4, "head_dim": 8, "text_config": {"kv": 2}}"#)
                .unwrap();
        assert_eq!(
            eval_size(&SizeExpr::Config("heads*head_dim".into()), Some(&cfg)),
            Ok(32)
        );
        assert_eq!(
            eval_size(&SizeExpr::Config("text_config.kv * 8".into()), Some(&cfg)),
            Ok(16)
        );
        assert!(eval_size(&SizeExpr::Config("missing".into()), Some(&cfg)).is_err());
        assert!(eval_size(&SizeExpr::Config("heads".into()), None).is_err());
    }
}
