"""Merge-numerics fixtures: single peft layers, their adapter tensors and the merged weight.

Each case wraps one layer (nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d, a
3-D MoE expert parameter) in a tiny nn.Module, applies a real peft 0.21.2 config with
randomised, non-zero adapter weights, saves the adapter with `save_pretrained`, merges with
`merge_and_unload()` and records, per case:

* `numerics/<case>.safetensors` (metadata {"format": "pt"}):
  `W` base weight (base dtype), the adapter tensors as peft saved them (`A`, `B`, `magnitude`,
  `lora_bias`, `ia3_l`, `hada_*`, `lokr_*`, `rows`), optional `bias`, and `expected` (the base
  weight after the merge), `expected_bias`, `expected_unmerged` where relevant;
* `numerics/<case>.json`: how peft was called (kind, method, r, alpha, use_rslora,
  fan_in_fan_out, base_dtype, use_dora, safe_merge, ...) plus `scaling`, peft's own Python float
  (the one the merge used: with `adapter_weight`, already multiplied by it);
* `adapter_weight` (weighted cases only): the merge ran inside
  `peft.helpers.rescale_adapter_scale(model, w)`, which multiplies the layer's f64 `scaling` by
  `w` (as `LoraLayer.scale_layer(w)` does) -- what `peftkit merge --adapter DIR:w` computes;
* `numerics/<case>.adapter/` (cases with `pipeline: true`): `adapter_config.json` and
  `adapter_model.safetensors` exactly as peft's `save_pretrained` wrote them, so that the Rust
  test can also run the whole `peftkit_merge::merge` on a base holding `layer.weight`
  (and `layer.bias`) and compare its output, the untouched bias included.

The Rust test `crates/peftkit-merge/tests/numerics_fixtures.rs` repeats each merge with the
kernels of `peftkit_merge` (and, for `pipeline` cases, with the merge pipeline) and
compares bit for bit.

Host independence: matrix products of rank > 192 (and some conv shapes) are split by MKL in a
CPU-dependent way; new cases keep r <= 192.

Determinism: fixed seeds per case, one thread, CPU only, PYTHONHASHSEED=0 (set by run.sh).
"""

import contextlib
import os
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path

if __package__:
    from .common import fresh_dir, write_json
else:  # run as a script: python tests/interop/fixturegen/numerics_cases.py
    from common import fresh_dir, write_json

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import peft  # noqa: E402
from peft.helpers import rescale_adapter_scale  # noqa: E402
from peft import (  # noqa: E402
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    TrainableTokensConfig,
    get_peft_model,
)

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class Holder(nn.Module):
    """A model with exactly one interesting child, `layer`."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class Experts(nn.Module):
    """A fused MoE expert block: one 3-D parameter, (E, out, in) or, transposed, (E, in, out)."""

    def __init__(self, e, out, inp, transposed):
        super().__init__()
        shape = (e, inp, out) if transposed else (e, out, inp)
        self.gate_up_proj = nn.Parameter(torch.randn(shape) * 0.1)
        if transposed:
            self.is_transposed = True

    def forward(self, x):
        return x


# peft writes auto_mapping.parent_library = Holder.__module__ into the adapter_config.json kept
# for pipeline cases; pin it so the bytes do not depend on how the generator is started.
Holder.__module__ = "fixturegen.numerics_cases"


def _layer(kind, dims):
    if kind == "linear":
        inp, out = dims
        return nn.Linear(inp, out, bias=True)
    if kind == "conv1d_gpt2":
        from transformers.pytorch_utils import Conv1D

        inp, out = dims
        layer = Conv1D(out, inp)  # weight (in, out)
        nn.init.normal_(layer.weight, std=0.05)
        nn.init.normal_(layer.bias, std=0.05)
        return layer
    if kind == "embedding":
        vocab, dim = dims
        return nn.Embedding(vocab, dim)
    if kind in ("conv1d", "conv2d", "conv3d"):
        inp, out, k = dims
        cls = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
        return cls(inp, out, k, bias=True)
    if kind == "experts":
        e, out, inp, transposed = dims
        return Experts(e, out, inp, transposed)
    raise ValueError(kind)


def _randomise(pm, seed):
    """Give every adapter parameter a realistic non-zero value (deterministic)."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if not any(t in name for t in ("lora_", "ia3_", "hada_", "lokr_", "trainable_tokens")):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "lora_A" in name or "lora_embedding_A" in name:
                val = noise * 0.1
            elif "lora_B" in name or "lora_embedding_B" in name:
                val = noise * 0.05
            elif "lora_magnitude_vector" in name:
                val = p.float() * (1.0 + 0.1 * noise)
            elif "ia3_l" in name:
                val = 1.0 + 0.2 * noise
            elif "trainable_tokens" in name:
                val = noise * 0.1
            else:  # LoHa / LoKr factors
                val = noise * 0.2
            p.copy_(val.to(p.dtype))


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _saved_adapter(pm, keep=None):
    """The adapter tensors as peft's `save_pretrained` writes them; with `keep`, its config and
    weights files are also copied there."""
    d = tempfile.mkdtemp()
    try:
        with warnings.catch_warnings():
            # peft 0.21.2 warns that `lora_B.bias` (lora_bias=True) is 1-D, as if it were a
            # ZeRO-3 shard; the tensor is complete.
            warnings.simplefilter("ignore")
            pm.save_pretrained(d)
        if keep is not None:
            keep.mkdir()
            for f in ADAPTER_FILES:
                shutil.copyfile(os.path.join(d, f), keep / f)
        return load_file(os.path.join(d, "adapter_model.safetensors"))
    finally:
        shutil.rmtree(d)


def _one(sd, suffix):
    keys = [k for k in sd if k.endswith(suffix)]
    if len(keys) != 1:
        raise RuntimeError(f"expected one key ending in {suffix!r}, got {keys}")
    return sd[keys[0]]


def _case(out_dir, name, spec):
    seed = spec["seed"]
    torch.manual_seed(seed)
    kind = spec["kind"]
    method = spec.get("method", "lora")
    dtype = DTYPES[spec["base_dtype"]]
    layer = _layer(kind, spec["dims"])
    model = Holder(layer).to(dtype)
    target = ["layer"]

    cfg_kwargs = dict(spec.get("config", {}))
    if method == "lora":
        if kind == "experts":
            config = LoraConfig(target_modules=[], target_parameters=["layer.gate_up_proj"], init_lora_weights=False, **cfg_kwargs)
        else:
            config = LoraConfig(target_modules=target, init_lora_weights=False, **cfg_kwargs)
    elif method == "ia3":
        ff = spec["feedforward"]
        config = IA3Config(target_modules=target, feedforward_modules=target if ff else [], init_ia3_weights=True, **cfg_kwargs)
    elif method == "loha":
        config = LoHaConfig(target_modules=target, init_weights=False, **cfg_kwargs)
    elif method == "lokr":
        config = LoKrConfig(target_modules=target, init_weights=False, **cfg_kwargs)
    elif method == "trainable_tokens":
        config = TrainableTokensConfig(target_modules=target, **cfg_kwargs)
    else:
        raise ValueError(method)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, config, autocast_adapter_dtype=spec.get("autocast", True))
    _randomise(pm, seed)
    pm.eval()
    pipeline = spec.get("pipeline", False)
    sd = _saved_adapter(pm, keep=out_dir / f"{name}.adapter" if pipeline else None)
    weight = spec.get("weight")
    if weight is not None and (method != "lora" or spec.get("unmerge")):
        raise ValueError(f"{name}: a merge weight is for plain LoRA merges")

    base = pm.base_model.model.layer
    inner = base.get_base_layer() if hasattr(base, "get_base_layer") else base
    param_name = "gate_up_proj" if kind == "experts" else "weight"
    tensors = {"W": getattr(inner, param_name).detach().clone()}
    if getattr(inner, "bias", None) is not None:
        tensors["bias"] = inner.bias.detach().clone()

    meta = {
        "kind": kind,
        "method": method,
        "base_dtype": spec["base_dtype"],
        "safe_merge": spec.get("safe_merge", False),
        "peft_version": peft.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    if pipeline:
        meta["pipeline"] = True
    if method == "lora":
        a_key = ".lora_embedding_A" if kind == "embedding" else ".lora_A.weight"
        b_key = ".lora_embedding_B" if kind == "embedding" else ".lora_B.weight"
        tensors["A"] = _one(sd, a_key)
        tensors["B"] = _one(sd, b_key)
        if config.use_dora:
            tensors["magnitude"] = _one(sd, ".lora_magnitude_vector")
        if config.lora_bias:
            tensors["lora_bias"] = _one(sd, ".lora_B.bias")
        meta.update(
            r=config.r,
            alpha=config.lora_alpha,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            lora_bias=config.lora_bias,
            fan_in_fan_out=bool(getattr(base, "fan_in_fan_out", False)),
            scaling=base.scaling["default"],
            adapter_dtype=str(tensors["A"].dtype).replace("torch.", ""),
        )
        if kind.startswith("conv") and kind != "conv1d_gpt2":
            meta["groups"] = inner.groups
        if kind == "experts":
            meta["num_experts"] = spec["dims"][0]
            meta["expert_layout"] = "in_out" if spec["dims"][3] else "out_in"
    elif method == "ia3":
        tensors["ia3_l"] = _one(sd, ".ia3_l")
        meta.update(feedforward=spec["feedforward"], fan_in_fan_out=bool(base.fan_in_fan_out))
    elif method in ("loha", "lokr"):
        prefix = "hada_" if method == "loha" else "lokr_"
        for k, v in sd.items():
            short = k.rsplit(".", 1)[-1]
            if short.startswith(prefix):
                tensors[short] = v
        meta.update(r=config.r, alpha=config.alpha, scaling=base.scaling["default"])
    elif method == "trainable_tokens":
        tensors["rows"] = _one(sd, ".trainable_tokens_delta")
        meta["token_indices"] = list(config.token_indices)

    # The adapter tensors must be what peft uses in memory, too (no hidden conversion).
    for key in ("A", "B"):
        if key in tensors and method == "lora":
            if kind == "embedding":
                live = (base.lora_embedding_A if key == "A" else base.lora_embedding_B)["default"]
            else:
                live = (base.lora_A if key == "A" else base.lora_B)["default"].weight
            assert torch.equal(live.detach().cpu(), tensors[key]), (name, key)

    if spec.get("unmerge"):
        pm.merge_adapter()
        pm.unmerge_adapter()
        tensors["expected_unmerged"] = getattr(inner, param_name).detach().clone()
        meta["unmerge"] = True

    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        if weight is not None:
            # The adapter merged with weight w: peft's own scaling (alpha/r, a Python float)
            # times w, in f64, as rescale_adapter_scale / scale_layer compute it.
            stack.enter_context(rescale_adapter_scale(pm, weight))
            meta["adapter_weight"] = weight
            meta["unweighted_scaling"] = meta["scaling"]
            meta["scaling"] = base.scaling["default"]
            assert meta["scaling"] == meta["unweighted_scaling"] * weight
        merged = pm.merge_and_unload(safe_merge=meta["safe_merge"])
    merged_layer = merged.layer
    tensors["expected"] = getattr(merged_layer, param_name).detach().clone()
    if "bias" in tensors:
        tensors["expected_bias"] = merged_layer.bias.detach().clone()

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / f"{name}.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / f"{name}.json", meta, sort_keys=True)


# name -> spec. `dims`: linear/conv1d_gpt2 (in, out); embedding (vocab, dim);
# conv (in, out, kernel); experts (E, out, in, transposed).
CASES = {
    "linear_f32_r8": dict(pipeline=True, kind="linear", dims=(48, 40), base_dtype="F32", config=dict(r=8, lora_alpha=16)),
    "linear_bf16_r8": dict(pipeline=True, kind="linear", dims=(48, 40), base_dtype="BF16", config=dict(r=8, lora_alpha=16)),
    "linear_f16_r8": dict(kind="linear", dims=(48, 40), base_dtype="F16", config=dict(r=8, lora_alpha=16)),
    "linear_f32_r16": dict(kind="linear", dims=(64, 48), base_dtype="F32", config=dict(r=16, lora_alpha=24)),
    "linear_bf16_r16": dict(kind="linear", dims=(64, 48), base_dtype="BF16", config=dict(r=16, lora_alpha=24)),
    "linear_f16_r16": dict(kind="linear", dims=(64, 48), base_dtype="F16", config=dict(r=16, lora_alpha=24)),
    "linear_f32_r3_alpha7": dict(kind="linear", dims=(33, 17), base_dtype="F32", config=dict(r=3, lora_alpha=7)),
    # r > 192: MKL splits the rank (256 -> 128+128; 193 -> 96+96+1; 512 -> 192+192+128).
    "linear_f32_r256": dict(kind="linear", dims=(64, 16), base_dtype="F32", config=dict(r=256, lora_alpha=16)),
    "linear_f32_r193": dict(kind="linear", dims=(20, 12), base_dtype="F32", config=dict(r=193, lora_alpha=8)),
    "linear_f32_r512": dict(kind="linear", dims=(24, 8), base_dtype="F32", config=dict(r=512, lora_alpha=32)),
    "linear_bf16_r256": dict(kind="linear", dims=(40, 16), base_dtype="BF16", config=dict(r=256, lora_alpha=16)),
    # Inexact scalings: 32/6 and 32/sqrt(6) are not f32 values, so peft's f64 division followed
    # by one rounding must be reproduced; with an adapter weight (0.6, chosen so that weighting
    # the f32 scaling would round differently: 3.2 vs 3.2000003) the weight multiplies the f64.
    "linear_f32_r6_alpha32": dict(pipeline=True, kind="linear", dims=(48, 40), base_dtype="F32", config=dict(r=6, lora_alpha=32)),
    "linear_bf16_r6_alpha32": dict(pipeline=True, kind="linear", dims=(48, 40), base_dtype="BF16", config=dict(r=6, lora_alpha=32)),
    "linear_f32_r6_alpha32_rslora": dict(pipeline=True, kind="linear", dims=(48, 40), base_dtype="F32", config=dict(r=6, lora_alpha=32, use_rslora=True)),
    "linear_bf16_r6_alpha32_rslora": dict(pipeline=True, kind="linear", dims=(48, 40), base_dtype="BF16", config=dict(r=6, lora_alpha=32, use_rslora=True)),
    "linear_f32_r6_alpha32_weighted": dict(pipeline=True, weight=0.6, kind="linear", dims=(48, 40), base_dtype="F32", config=dict(r=6, lora_alpha=32)),
    "linear_f32_r6_alpha32_rslora_weighted": dict(pipeline=True, weight=0.6, kind="linear", dims=(48, 40), base_dtype="F32", config=dict(r=6, lora_alpha=32, use_rslora=True)),
    "linear_bf16_r6_alpha32_weighted": dict(pipeline=True, weight=0.6, kind="linear", dims=(48, 40), base_dtype="BF16", config=dict(r=6, lora_alpha=32)),
    "linear_f32_rslora": dict(kind="linear", dims=(48, 40), base_dtype="F32", config=dict(r=16, lora_alpha=8, use_rslora=True)),
    "linear_bf16_rslora": dict(kind="linear", dims=(48, 40), base_dtype="BF16", config=dict(r=12, lora_alpha=5, use_rslora=True)),
    "linear_f32_lora_bias": dict(pipeline=True, kind="linear", dims=(48, 40), base_dtype="F32", config=dict(r=8, lora_alpha=16, lora_bias=True)),
    "linear_bf16_lora_bias": dict(kind="linear", dims=(48, 40), base_dtype="BF16", config=dict(r=8, lora_alpha=16, lora_bias=True)),
    "linear_bf16_safe": dict(kind="linear", dims=(48, 40), base_dtype="BF16", safe_merge=True, config=dict(r=8, lora_alpha=16)),
    "linear_f16_safe_lora_bias": dict(kind="linear", dims=(48, 40), base_dtype="F16", safe_merge=True, config=dict(r=8, lora_alpha=16, lora_bias=True)),
    "linear_bf16_unmerge": dict(kind="linear", dims=(48, 40), base_dtype="BF16", unmerge=True, config=dict(r=8, lora_alpha=16)),
    # autocast_adapter_dtype=False: BF16 adapter on CPU, delta rounded to BF16 before the add.
    "linear_bf16_uncast_adapter": dict(kind="linear", dims=(48, 40), base_dtype="BF16", autocast=False, config=dict(r=8, lora_alpha=16)),
    "conv1d_gpt2_f32": dict(kind="conv1d_gpt2", dims=(48, 40), base_dtype="F32", config=dict(r=8, lora_alpha=16)),
    "conv1d_gpt2_bf16": dict(kind="conv1d_gpt2", dims=(48, 40), base_dtype="BF16", config=dict(r=8, lora_alpha=16)),
    "embedding_f32": dict(kind="embedding", dims=(100, 32), base_dtype="F32", config=dict(r=8, lora_alpha=16)),
    "embedding_bf16": dict(kind="embedding", dims=(100, 32), base_dtype="BF16", config=dict(r=8, lora_alpha=16)),
    "conv2d_3x3_f32": dict(kind="conv2d", dims=(32, 64, 3), base_dtype="F32", config=dict(r=8, lora_alpha=16)),
    "conv2d_3x3_bf16": dict(kind="conv2d", dims=(16, 32, 3), base_dtype="BF16", config=dict(r=8, lora_alpha=16)),
    "conv2d_1x1_f32": dict(kind="conv2d", dims=(32, 64, 1), base_dtype="F32", config=dict(r=8, lora_alpha=16)),
    "conv1d_f32": dict(kind="conv1d", dims=(16, 24, 3), base_dtype="F32", config=dict(r=4, lora_alpha=8)),
    "conv3d_f32": dict(kind="conv3d", dims=(8, 16, 3), base_dtype="F32", config=dict(r=4, lora_alpha=8)),
    "experts_f32": dict(kind="experts", dims=(3, 24, 20, False), base_dtype="F32", config=dict(r=4, lora_alpha=8)),
    "experts_bf16": dict(kind="experts", dims=(3, 24, 20, False), base_dtype="BF16", config=dict(r=4, lora_alpha=8)),
    "experts_transposed_f32": dict(kind="experts", dims=(3, 24, 20, True), base_dtype="F32", config=dict(r=4, lora_alpha=8)),
    "dora_linear_f32": dict(kind="linear", dims=(64, 48), base_dtype="F32", config=dict(r=8, lora_alpha=16, use_dora=True)),
    "dora_linear_bf16": dict(kind="linear", dims=(64, 48), base_dtype="BF16", config=dict(r=8, lora_alpha=16, use_dora=True)),
    "dora_linear_f32_odd": dict(kind="linear", dims=(45, 20), base_dtype="F32", config=dict(r=4, lora_alpha=8, use_dora=True)),
    "dora_conv1d_gpt2_f32": dict(kind="conv1d_gpt2", dims=(48, 40), base_dtype="F32", config=dict(r=8, lora_alpha=16, use_dora=True)),
    "dora_embedding_f32": dict(kind="embedding", dims=(100, 32), base_dtype="F32", config=dict(r=8, lora_alpha=16, use_dora=True)),
    "dora_conv2d_f32": dict(kind="conv2d", dims=(16, 32, 3), base_dtype="F32", config=dict(r=4, lora_alpha=8, use_dora=True)),
    "ia3_linear_f32": dict(kind="linear", method="ia3", feedforward=False, dims=(48, 40), base_dtype="F32"),
    "ia3_linear_bf16": dict(kind="linear", method="ia3", feedforward=False, dims=(48, 40), base_dtype="BF16"),
    "ia3_linear_ff_f32": dict(pipeline=True, kind="linear", method="ia3", feedforward=True, dims=(48, 40), base_dtype="F32"),
    "loha_linear_f32": dict(pipeline=True, kind="linear", method="loha", dims=(48, 40), base_dtype="F32", config=dict(r=4, alpha=8)),
    "loha_linear_bf16": dict(pipeline=True, kind="linear", method="loha", dims=(48, 40), base_dtype="BF16", config=dict(r=4, alpha=8)),
    "lokr_linear_f32": dict(pipeline=True, kind="linear", method="lokr", dims=(128, 32), base_dtype="F32", config=dict(r=4, alpha=8)),
    "lokr_linear_full_f32": dict(pipeline=True, kind="linear", method="lokr", dims=(48, 40), base_dtype="F32", config=dict(r=4, alpha=8)),
    "trainable_tokens_bf16": dict(kind="embedding", method="trainable_tokens", dims=(100, 32), base_dtype="BF16", config=dict(token_indices=[3, 7, 11, 99])),
}


def generate(root: Path):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out_dir = fresh_dir(Path(root) / "numerics")
    for name, spec in CASES.items():
        spec = dict(spec)
        # A seed from the name, so adding a case does not change the others.
        spec.setdefault("seed", zlib.crc32(name.encode()) % 100_000)
        _case(out_dir, name, spec)
        print(f"  numerics/{name}")


if __name__ == "__main__":
    import sys

    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "fixtures")
