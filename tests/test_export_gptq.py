"""`semisparse export --quant-method gptq`: one layer against a float64 column-by-column reference written from the
GPTQ paper (explicit inverse Hessian, no lazy blocks), GPTQ beating RTN on layer output error, the pattern and
format surviving a whole-model export, the bad-input combinations (exit 2, one line, before any model loads), and
the shipped SmolLM2 (marked realmodel)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import semisparse
from clirun import one_line_error
from semisparse import api
from semisparse.export import quant
from semisparse.export.gptq import gptq_quantize
from semisparse.export.pack import pack_layer
from semisparse.layers import weight_matrix
from semisparse.masks import Pattern, is_nm, nm_mask

PAT = Pattern.parse("2:4")
QMAX = {"int8": 127, "int4": 7}


def random_layer(out=16, inp=64, tokens=256, seed=0):
    """A 2:4 (magnitude) weight and correlated inputs with uneven column scales, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    X *= torch.rand(inp, generator=g) * 3 + 0.1
    mask = nm_mask(W.abs(), PAT)
    return W * mask, mask, X


def reference_scale(values: torch.Tensor, qmax: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """quant.py's rule: max|v| / qmax, computed in float32, rounded to the storage dtype; 1 for all-zero values."""
    amax = values.abs().amax(-1, keepdim=True).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(scale_dtype).double()


def gptq_reference(W, mask, X, scheme, group, scale_dtype, percdamp=0.01):
    """GPTQ (Frantar et al. 2023, Algorithm 1 before its Cholesky/lazy-batch rewrite), float64, column by column.

    Column j: round each row to its scale's grid (a pruned entry's target is 0), then move the not-yet-quantized
    columns by the OBS update -err / [H_F⁻¹]_00 · [H_F⁻¹]_0,: with H_F the dampened Hessian restricted to columns
    j.. (explicit inverse). int8: row scales from the original kept values; int4: a group of ``group`` kept values
    spans 2·group dense columns (2:4); its scale comes from its kept values as updated when its first column comes.
    Returns the de-quantized weight and the integer codes (dense layout, 0 where pruned)."""
    W = W.double().clone()
    H = 2 * X.double().T @ X.double()
    cols = W.shape[1]
    H += percdamp * H.diag().mean() * torch.eye(cols, dtype=torch.float64)
    qmax = QMAX[scheme]
    span = cols if scheme == "int8" else 2 * group
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scale = None
    for j in range(cols):
        if j % span == 0:
            rows = [W[r, j : j + span][mask[r, j : j + span]] for r in range(W.shape[0])]
            scale = reference_scale(torch.stack(rows), qmax, scale_dtype)[:, 0]
        Hinv = torch.linalg.inv(H[j:, j:])
        w = W[:, j].clone()
        c = torch.clamp(torch.round(w / scale), -qmax, qmax) * mask[:, j]
        codes[:, j] = c
        Q[:, j] = c * scale
        W[:, j:] -= ((w - Q[:, j]) / Hinv[0, 0]).unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[:, j] = Q[:, j]
    return Q, codes


def rtn_dense(W, mask, scheme, group, scale_dtype):
    packed = pack_layer(W, mask, PAT)
    r = quant.quantize(packed.values, scheme, group, scale_dtype)
    dense = torch.zeros_like(W)
    dense[mask] = quant.dequantize(r.codes, r.scales, scheme, r.group_size, tuple(packed.values.shape)).flatten()
    return dense


def output_error(W, Q, X) -> float:
    return float(((W.double() - Q.double()) @ X.double().T).norm())


CASES = [("int8", None, 128), ("int4", 8, 128), ("int4", 4, 16), ("int4", 16, 16)]


@pytest.mark.parametrize("scheme,group,blocksize", CASES)
def test_gptq_matches_float64_reference(scheme, group, blocksize):
    W, mask, X = random_layer()
    H = 2 * X.double().T @ X.double()
    ref_q, ref_codes = gptq_reference(W, mask, X, scheme, group, torch.float16)
    dense64, res64 = gptq_quantize(W, mask, H, PAT, scheme, group, torch.float16, blocksize=blocksize,
                                   dtype=torch.float64)
    width = W.shape[1] // 2
    got_codes = torch.zeros_like(ref_codes)
    scales = res64.scales.double().reshape(W.shape[0], -1)
    got_codes[mask] = (quant.dequantize(res64.codes, torch.ones_like(res64.scales), scheme, res64.group_size,
                                        (W.shape[0], width))).double().flatten()
    assert torch.equal(got_codes, ref_codes)  # every integer code, the same
    assert torch.allclose(dense64.double(), ref_q, rtol=0, atol=1e-6 * float(scales.max()))
    assert (dense64[~mask] == 0).all()
    # The float32 path: the same codes but for the odd value within float32 noise of a rounding boundary.
    dense32, _ = gptq_quantize(W, mask, H, PAT, scheme, group, torch.float16, blocksize=blocksize)
    step = float(scales.max())
    assert (dense32.double() - ref_q).abs().le(1e-3 * step).float().mean() > 0.97
    assert abs(output_error(W, dense32, X) / output_error(W, ref_q, X) - 1) < 0.02


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 8), ("int4", 16)])
def test_gptq_beats_rtn_on_layer_output_error(scheme, group):
    for seed in range(3):
        W, mask, X = random_layer(out=32, inp=128, tokens=512, seed=seed)
        H = 2 * X.T @ X / X.shape[0]
        dense, _ = gptq_quantize(W, mask, H, PAT, scheme, group, torch.float16)
        assert (dense[~mask] == 0).all()  # the pattern survives: pruned entries exactly 0
        gptq_err, rtn_err = output_error(W, dense, X), output_error(W, rtn_dense(W, mask, scheme, group,
                                                                                 torch.float16), X)
        # Measured 0.88-0.90 of RTN's error; dropping the updates of pruned entries instead of passing them on
        # (see gptq.py) measures 0.93-0.96, so this bound also tells the two apart.
        assert gptq_err < 0.92 * rtn_err, (seed, gptq_err, rtn_err)


# ------------------------------------------------------------------------------------------ whole models


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("runs") / "llama-2of4"
    api.prune(str(tiny_dir), "magnitude", "2:4", out=out, device="cpu", progress=False)
    return out


def layer_inputs(run_dir, ids) -> tuple[dict, dict]:
    """({sparse layer: W ⊙ M}, {sparse layer: its inputs [tokens, in]}) of the run directory's own model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32).eval()
    masks = load_file(str(run_dir / "masks.safetensors"))
    inputs, handles = {}, []
    for name in masks:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(
            lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    weights = {name: weight_matrix(model.get_submodule(name)).clone() for name in masks}
    return weights, {name: torch.cat(x) for name, x in inputs.items()}


def test_gptq_export_keeps_the_pattern_and_beats_rtn(tmp_path, llama_run, text):
    from semisparse import data
    from semisparse.export.load import load_export

    common = dict(format="packed", dtype="fp32", quant="int4", group_size=16, progress=False)
    m = api.export(llama_run, tmp_path / "gptq", quant_method="gptq", calib=str(text), nsamples=8, seqlen=64,
                   device="cpu", **common)
    api.export(llama_run, tmp_path / "rtn", **common)
    rec = m["quantization"]
    assert rec["method"] == "gptq" and rec["damping"] == 0.01 and rec["blocksize"] == 128
    assert rec["calibration"]["nsamples"] == 8 and rec["calibration"]["seqlen"] == 64
    assert m["options"]["quant_method"] == "gptq"

    masks = load_file(str(llama_run / "masks.safetensors"))
    gptq_model = semisparse.load(tmp_path / "gptq")
    rtn_model = load_export(tmp_path / "rtn")[0]
    ids = data.tokenize_joined(load_export(tmp_path / "rtn")[1], data.load_text(str(text), split="eval").docs)
    weights, inputs = layer_inputs(llama_run, ids[None, :256])
    better = 0
    total = {"gptq": 0.0, "rtn": 0.0}
    for name, mask in masks.items():
        w_gptq = weight_matrix(gptq_model.get_submodule(name))
        assert (w_gptq[~mask] == 0).all() and is_nm(mask, PAT)  # every sparse layer still exactly 2:4
        errors = {k: output_error(weights[name], weight_matrix(mod.get_submodule(name)), inputs[name])
                  for k, mod in (("gptq", gptq_model), ("rtn", rtn_model))}
        better += errors["gptq"] < errors["rtn"]
        for k in total:
            total[k] += errors[k] ** 2
    # Per-layer output error, not perplexity: on a tiny random model perplexity sits near the vocabulary size and
    # moves by noise; the layer outputs are what GPTQ minimizes. Inputs here are the unquantized model's, which
    # GPTQ's later blocks never saw, so a layer may lose: most must win and the sum must.
    assert total["gptq"] < 0.9 * total["rtn"], total
    assert better >= 0.75 * len(masks), (better, len(masks))


def test_gptq_int8_export_and_manifest(tmp_path, llama_run, text):
    m = api.export(llama_run, tmp_path / "gptq8", quant="int8", quant_method="gptq", calib=str(text), nsamples=2,
                   seqlen=100000, device="cpu", progress=False)
    # seqlen capped at the model's context (256 positions) and at what the text gives
    assert m["quantization"]["calibration"]["seqlen"] <= min(256, m["quantization"]["calibration"]["stream_tokens"])
    assert all(len(rec["bytes"]) == 3 for rec in m["layers"].values())
    scales = load_file(str(tmp_path / "gptq8" / "model.packed.safetensors"))
    assert all(scales[f"{name}.weight.scales"].shape == (rec["shape"][0],) for name, rec in m["layers"].items())
    model = semisparse.load(tmp_path / "gptq8")
    for name, mask in load_file(str(llama_run / "masks.safetensors")).items():
        assert (weight_matrix(model.get_submodule(name))[~mask] == 0).all()


@pytest.mark.parametrize("flags,needle", [
    (("--quant", "none", "--quant-method", "gptq"), "needs --quant int8 or int4"),
    (("--quant-method", "gptq"), "needs --quant int8 or int4"),
    (("--format", "hf", "--quant-method", "gptq"), "needs --format packed"),
    (("--format", "gguf", "--quant", "q4_0", "--quant-method", "gptq"), "needs --format packed"),
    (("--quant", "int4", "--quant-method", "awq"), "unknown --quant-method"),
    (("--quant", "int4", "--nsamples", "8"), "rtn takes none"),
    (("--quant", "int4", "--quant-method", "gptq", "--nsamples", "0"), "--nsamples must be positive"),
    (("--quant", "int4", "--quant-method", "gptq", "--group-size", "1"), "multiple of N=2"),
])
def test_bad_combinations_fail_before_the_model_loads(tmp_path, llama_run, cli, monkeypatch, flags, needle):
    from semisparse.export import source

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(source, "read_source", no_load)
    out = tmp_path / ("out.gguf" if "gguf" in flags else "out")
    line = one_line_error(cli("export", llama_run, "--out", out, *flags))
    assert needle in line, line
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the shipped model


@pytest.mark.realmodel
def test_gptq_beats_rtn_on_smollm2(tmp_path):
    """SmolLM2-135M, SparseGPT 2:4 (8 × 256 calibration), int4 at the default group sizes: GPTQ (8 × 256) has the
    lower perplexity on 2 windows of 512 tokens of the shipped held-out text."""
    from semisparse import data
    from semisparse.evaluate.perplexity import perplexity
    from semisparse.export.load import load_export

    run = tmp_path / "sparsegpt"
    api.prune("default", "sparsegpt", "2:4", "default", out=run, nsamples=8, seqlen=256, device="auto",
              progress=False)
    ppl = {}
    for method in ("rtn", "gptq"):
        extra = dict(calib="default", nsamples=8, seqlen=256) if method == "gptq" else {}
        api.export(run, tmp_path / method, quant="int4", quant_method=method, progress=False, **extra)
        model, tok, manifest = load_export(tmp_path / method, dtype=torch.float32)
        assert manifest["quantization"]["method"] == method
        tokens = data.tokenize_joined(tok, data.load_text("default", split="eval").docs)[: 2 * 512]
        ppl[method] = perplexity(model, tokens, seqlen=512, progress=False).ppl
    assert ppl["gptq"] < ppl["rtn"], ppl
