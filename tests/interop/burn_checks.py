#!/usr/bin/env python3
"""Live checks of crates/peftkit-burn: transformers and peft against the burn example.

Run by tests/interop/run.sh with BURN_EXAMPLE pointing at the built `finetune_llama` example.
For each tiny model of tests/fixtures/burn (made by the real transformers and peft), on this host:

* forward: burn's logits (`--steps 0`: the fresh adapter is a no-op) agree with transformers'
  eager f32 forward pass within 1e-4 * max(1, |logits|);
* trained: the example's loss falls; peft loads the burn-trained adapter onto the base and
  reproduces burn's probe logits within the bound; the adapter changes the logits;
* merged: the `--save-merged` checkpoint loads in transformers with the logits peft's own
  `merge_and_unload()` gives (identical), and those match burn's probe within the bound (f32
  bases; a bf16 merge is rounded to bf16);
* imported: the peft-made adapter applied in burn (`--adapter`) gives peft's logits within the
  bound.

Logits depend on the CPU, so every reference is computed here, never read from a file.
Prints one line per check and a final 'N passed, N failed' line; exits 1 on any failure.
"""
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturegen.burn_cases import CASES  # noqa: E402
from fixturegen.common import quiet  # noqa: E402

FIX = REPO / "tests" / "fixtures" / "burn"
EXAMPLE = os.environ.get("BURN_EXAMPLE", str(REPO / "target" / "debug" / "examples" / "finetune_llama"))
TRAIN = ["--steps", "12", "--r", "4", "--alpha", "8", "--lr", "0.05"]
TARGETS = {"qwen2": "q_proj,k_proj,v_proj,o_proj", "mistral": "all-linear"}


def example(*args):
    res = subprocess.run([EXAMPLE, *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"finetune_llama {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stderr}")
    return res.stdout


def probe(out: Path):
    t = load_file(out / "probe.safetensors")
    assert t["input_ids"].dtype == torch.int64 and t["logits"].dtype == torch.float32
    return t["input_ids"], t["logits"]


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def peft_model(base, adapter, dtype=torch.float32):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(base, dtype), adapter).eval()


def assert_close(ours, theirs, what):
    """|ours - theirs| <= 1e-4 * max(1, |theirs|), element by element."""
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    excess = (ours - theirs).abs() - 1e-4 * theirs.abs().clamp(min=1.0)
    worst = (ours - theirs).abs().max().item()
    assert excess.max().item() <= 0, f"{what}: max |diff| {worst:.3g} exceeds 1e-4 * max(1, |logits|)"
    return worst


def check_case(name):
    base, fixture_adapter = FIX / name / "base", FIX / name / "adapter"
    bf16 = CASES[name][3] == torch.bfloat16
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        targets = ["--targets", TARGETS.get(name, "q_proj,v_proj")]
        # Forward pass: an untrained (zero-B) adapter leaves the base logits.
        example("--base", base, "--out", tmp / "zero", "--steps", 0, *targets)
        ids, ours = probe(tmp / "zero")
        base_logits = logits_of(hf_model(base), ids)
        notes.append(f"forward {assert_close(ours, base_logits, 'burn forward vs transformers'):.1e}")

        # Training, then peft loads the adapter burn wrote.
        log = example("--base", base, "--out", tmp / "trained", "--save-merged", tmp / "merged", *TRAIN, *targets)
        losses = [float(line.split()[-1]) for line in log.splitlines() if line.startswith("step ")]
        assert len(losses) == 12 and losses[-1] < losses[0], f"loss did not fall: {losses}"
        ids, trained = probe(tmp / "trained")
        peft_logits = logits_of(peft_model(base, tmp / "trained"), ids)
        notes.append(f"trained {assert_close(trained, peft_logits, 'peft with the burn adapter vs burn'):.1e}")
        change = (peft_logits - base_logits).abs().max().item()
        assert change > 1e-3, f"the trained adapter changes the logits by only {change:.3g}"

        # The merged checkpoint: peft's own merge, and (f32) burn's logits.
        dtype = torch.bfloat16 if bf16 else torch.float32
        merged = logits_of(hf_model(tmp / "merged", dtype), ids)
        peft_merged = logits_of(peft_model(base, tmp / "trained", dtype).merge_and_unload(), ids)
        assert torch.equal(merged, peft_merged), f"merged logits differ from peft's merge by {(merged - peft_merged).abs().max():.3g}"
        if not bf16:
            notes.append(f"merged {assert_close(trained, merged, 'merged checkpoint vs burn'):.1e}")

        # A peft-made adapter imported into burn.
        example("--base", base, "--out", tmp / "imported", "--adapter", fixture_adapter, "--steps", 0)
        ids, imported = probe(tmp / "imported")
        theirs = logits_of(peft_model(base, fixture_adapter), ids)
        notes.append(f"imported {assert_close(imported, theirs, 'burn with the peft adapter vs peft'):.1e}")
        assert (theirs - base_logits).abs().max().item() > 1e-3, "the fixture adapter is a no-op"
    return ", ".join(notes)


def main():
    quiet()
    warnings.simplefilter("ignore")
    passed = failed = 0
    for name in CASES:
        try:
            notes = check_case(name)
            print(f"PASS burn {name} (max |diff|: {notes})")
            passed += 1
        except Exception:  # noqa: BLE001 - report every failure, keep going
            print(f"FAIL burn {name}")
            traceback.print_exc()
            failed += 1
    print(f"burn interop: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
