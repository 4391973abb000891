#!/usr/bin/env python3
"""Fixture drift check: regenerate every fixture into a temporary folder with the pinned stack and
compare it with the committed tests/fixtures/.

    python tests/interop/drift.py            (run by tests/interop/run.sh)

Files must be byte-identical, except the files listed in HOST_DEPENDENT, which hold floats that
MKL and oneDNN round differently on different CPUs. Those are compared tensor by tensor: the same
names, dtypes, shapes and header metadata, and float values within a bound measured between CPU
families (docs/formats.md, "Host-dependent floats"). HOST.json names the CPU the committed
fixtures were made on; it differs by design. Prints one line per difference and a final
'N passed, N failed' line; exits 1 on any failure.
"""
import fnmatch
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMITTED = HERE.parent / "fixtures"

# (pattern, bound in units in the last place of the tensor's largest magnitude, what varies).
# Measured between an AMD EPYC (Zen 4, AVX-512) and an Intel Xeon (Sapphire Rapids, AVX-512 +
# AMX): merged weights differed by at most 1 such ulp, logits by at most 18.6.
HOST_DEPENDENT = [
    ("*/logits.safetensors", 64, "logits: GEMMs and convolutions in MKL/oneDNN"),
    ("numerics/*.safetensors", 4, "high-rank and convolution merges (MKL blocking, oneDNN)"),
    ("peft/*/merged/*.safetensors", 4, "convolution merges (oneDNN)"),
    ("convert/*/merged/*.safetensors", 4, "products narrower than MKL's main kernels"),
    # bitsandbytes' CPU dequantizer writes FP4's zero as +0 with AVX-512 and -0 without (equal as floats).
    ("bnb/*/merged_dequantized/*.safetensors", 4, "FP4 zero sign (bitsandbytes' AVX-512 kernel)"),
    ("quant/*/merged_dequantized/*.safetensors", 4, "LoRA products into FP8 bases (MKL)"),
    # Re-quantized from the line above: a bf16 ulp of a block's largest value moves its scale by
    # as much (scales are measured in bf16 ulps, see SCALES_IN_BF16_ULPS) and an e4m3 element by
    # at most one e4m3 step.
    ("quant/*/merged_fp8/*.safetensors", 4, "re-quantized LoRA products into FP8 bases (MKL)"),
    ("quant_multi/fp8_*/merged_dequantized/*.safetensors", 4, "LoRA products into FP8 bases (MKL)"),
    ("quant_multi/fp8_*/merged_fp8/*.safetensors", 4, "re-quantized LoRA products into FP8 bases (MKL)"),
]
# FP8 scales derive from a bf16 block maximum: their bound is in bf16 ulps of the largest scale.
SCALES_IN_BF16_ULPS = "_scale_inv"
NOT_GENERATED = {"README.md", "HOST.json"}  # top level: written by hand / describes the host


def bound_for(rel: str):
    return next((b for pat, b, _ in HOST_DEPENDENT if fnmatch.fnmatch(rel, pat)), None)


def ulp_of_max(t, mantissa=None):
    import torch

    if mantissa is None:
        mantissa = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52,
                    torch.float8_e4m3fn: 3, torch.float8_e8m0fnu: 0}[t.dtype]
    m = t.double().abs().max().item()
    return 2.0 ** (math.frexp(m)[1] - 1 - mantissa) if m > 0 else 0.0


def header(path: Path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))
    meta = h.pop("__metadata__", None)
    return meta, {k: (v["dtype"], v["shape"]) for k, v in h.items()}


def compare_within(ours: Path, theirs: Path, bound: int):
    """Problems found comparing two safetensors files whose floats may differ by `bound` ulp."""
    import torch
    from safetensors.torch import load_file

    if header(ours) != header(theirs):
        return ["header (names, dtypes, shapes or metadata) differs"]
    a, b = load_file(ours), load_file(theirs)
    problems = []
    for k in b:
        if torch.equal(a[k], b[k]):
            continue
        if not a[k].is_floating_point():
            problems.append(f"{k}: integer tensor differs")
            continue
        d = (a[k].double() - b[k].double()).abs().max().item()
        allowed = bound * ulp_of_max(b[k], 7 if k.endswith(SCALES_IN_BF16_ULPS) else None)
        if not d <= allowed:
            problems.append(f"{k}: differs by {d:.3g}, more than {bound} ulp of its largest value ({allowed:.3g})")
    return problems


def files(root: Path):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - NOT_GENERATED


def main():
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        subprocess.run([sys.executable, str(HERE / "make_fixtures.py"), "--out", str(fresh)], check=True,
                       stdout=subprocess.DEVNULL)
        committed, regenerated = files(COMMITTED), files(fresh)
        failures = [f"only committed (no longer generated): {f}" for f in sorted(committed - regenerated)]
        failures += [f"generated but not committed: {f}" for f in sorted(regenerated - committed)]
        same = within = 0
        for rel in sorted(committed & regenerated):
            ours, theirs = fresh / rel, COMMITTED / rel
            if ours.read_bytes() == theirs.read_bytes():
                same += 1
                continue
            bound = bound_for(rel)
            problems = ["bytes differ"] if bound is None else compare_within(ours, theirs, bound)
            if problems:
                failures.append(f"{rel}: {'; '.join(problems)}")
            else:
                within += 1
    for f in failures:
        print(f"DRIFT {f}")
    print(f"drift: {same} files identical, {within} host-dependent files within their bound")
    print(f"drift: {same + within} passed, {len(failures)} failed")
    if failures:
        print("drift: regenerate with tests/interop/run.sh --regen and commit, or fix the generator")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
