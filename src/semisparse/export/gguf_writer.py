"""The ``gguf`` format: one GGUF file that llama.cpp (and ollama, LM Studio, ...) loads; llama architecture only.

Written with the ``gguf`` package (its writer, tensor-name map and block quantizers), not a copy of llama.cpp's
converter. What goes into the file and where it comes from:

    llama.* keys        the transformers config: context length, embedding length, blocks, feed-forward length,
                        heads and KV heads, head size, rope base (and linear scaling), RMS eps, vocab size
    tensors             the state dict under llama.cpp's names; q/k rows in llama.cpp's rotary order
                        (``permute_rotary``); a tied LM head is not stored (llama.cpp then reuses token_embd)
    tokenizer.*         copied from the GGUF the dense model came from (the shipped SmolLM2) when its vocabulary
                        and merges are the run's, else built from the run directory's byte-level BPE tokenizer
    semisparse.export   a JSON string: options, pattern, tensor types, the run directory and its semisparse.json

Tensor types (``tensor_type``): 1-D tensors F32; 2-D ones Q8_0 or Q4_0 (q4_0: the embedding and LM head Q8_0),
or the --dtype float type with --quant none or when a row is not a whole number of 32-value blocks. Q8_0 and Q4_0
store a zero weight as exactly 0, so the N:M zeros survive, densely: GGUF has no sparse tensor type.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from semisparse import rundir
from semisparse.errors import UserError

FORMAT_NAME = "semisparse-gguf"
FORMAT_VERSION = 1
PROVENANCE_KEY = "semisparse.export"
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}  # transformers model_type -> GGUF architecture

_Q = gguf.GGMLQuantizationType
QUANT_TYPES = {"q8_0": _Q.Q8_0, "q4_0": _Q.Q4_0}
FLOAT_TYPES = {"fp16": _Q.F16, "bf16": _Q.BF16, "fp32": _Q.F32}
_FILE_TYPES = {_Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, _Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
               _Q.F16: gguf.LlamaFileType.MOSTLY_F16, _Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
               _Q.F32: gguf.LlamaFileType.ALL_F32}
# Kept at 8 bits in a q4_0 file, as llama.cpp's quantizer and the shipped Q4_1 SmolLM2 do: the (tied) LM head is
# the tensor 4 bits hurt most, and it is dense anyway.
_EIGHT_BIT_IN_Q4 = ("token_embd.weight", "output.weight")


@dataclass
class KV:
    """One GGUF metadata entry, as ``GGUFWriter.add_key_value`` takes it."""

    key: str
    value: Any
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


# ------------------------------------------------------------------------------------------------ checks


def check_target(run_dir: Path, out: Path, overwrite: bool) -> None:
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--out {out}: --format gguf writes one file, give it a .gguf name")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: --format gguf writes one file (--out FILE.gguf)")
    if run_dir.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside the run directory {run_dir}: choose a path outside it")
    if out.exists() and not overwrite:
        raise UserError(f"output file {out} exists (pass --overwrite to replace it)")


def check_architecture(run_dir: Path) -> str:
    """The model's transformers model_type when the GGUF writer names it, else a one-line UserError."""
    config = rundir.read_json(run_dir / rundir.MODEL_CONFIG)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        classes = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise UserError(f"--format gguf writes {', '.join(ARCHITECTURES)}-architecture models only: {run_dir} is "
                        f"a {model_type!r} model ({classes}); use --format packed or hf")
    return model_type


# ------------------------------------------------------------------------------------------------ hyperparameters


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def rope(cfg) -> tuple[float, str, float | None]:
    """(base, type, linear factor) from transformers 5's ``rope_parameters`` or the older ``rope_theta`` and
    ``rope_scaling``; rope types llama.cpp would need extra tensors or keys for are refused."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    base = params.get("rope_theta", getattr(cfg, "rope_theta", None)) or 10000.0
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in ("default", "linear"):
        raise UserError(f"rope type {kind!r} is not supported by the GGUF writer (default and linear only)")
    return float(base), kind, (float(params["factor"]) if kind == "linear" else None)


def architecture_kvs(cfg, arch: str) -> list[KV]:
    """The llama.* keys llama.cpp's llama loader reads."""
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {cfg.hidden_act!r}: llama.cpp's llama architecture computes SiLU only")
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    base, kind, factor = rope(cfg)
    kvs = [
        KV(f"{arch}.vocab_size", cfg.vocab_size, u32),
        KV(f"{arch}.context_length", cfg.max_position_embeddings, u32),
        KV(f"{arch}.embedding_length", cfg.hidden_size, u32),
        KV(f"{arch}.block_count", cfg.num_hidden_layers, u32),
        KV(f"{arch}.feed_forward_length", cfg.intermediate_size, u32),
        KV(f"{arch}.attention.head_count", cfg.num_attention_heads, u32),
        KV(f"{arch}.attention.head_count_kv", kv_heads(cfg), u32),
        KV(f"{arch}.rope.dimension_count", head_dim(cfg), u32),
        KV(f"{arch}.rope.freq_base", base, f32),
        KV(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), f32),
    ]
    if head_dim(cfg) * cfg.num_attention_heads != cfg.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        kvs += [KV(f"{arch}.attention.key_length", head_dim(cfg), u32),
                KV(f"{arch}.attention.value_length", head_dim(cfg), u32)]
    if kind == "linear":
        kvs += [KV(f"{arch}.rope.scaling.type", gguf.RopeScalingType.LINEAR.value, gguf.GGUFValueType.STRING),
                KV(f"{arch}.rope.scaling.factor", factor, f32)]
    return kvs


# ------------------------------------------------------------------------------------------------ tensors


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (or biases) from transformers' rotary layout to llama.cpp's, as llama.cpp's converter permutes.

    Per head of ``d`` rows, transformers rotates row i with row i + d/2, llama.cpp rotates rows 2i and 2i + 1, so
    row ``i`` of a head moves to ``2i`` and row ``d/2 + i`` to ``2i + 1``. Reading a GGUF back (transformers'
    loader, models.py) applies the inverse; the rows are whole, so each row's N:M pattern moves with it."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def tensor_type(name: str, shape: tuple[int, ...], quant: str, dtype: str) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return _Q.F32  # norms and biases: tiny, and what llama.cpp's converter writes
    if quant == "none":
        return FLOAT_TYPES[dtype]
    qtype = _Q.Q8_0 if quant == "q8_0" or name in _EIGHT_BIT_IN_Q4 else QUANT_TYPES[quant]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else FLOAT_TYPES[dtype]  # blocks run along a row


@dataclass
class GGUFTensor:
    name: str  # llama.cpp's name
    source: str  # the state-dict key
    data: np.ndarray  # what the writer stores: float16/float32, or the block format's bytes
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # [rows, row length], as transformers has it


def model_tensors(model, arch, quant: str, dtype: str) -> list[GGUFTensor]:
    """Every tensor of the model under its llama.cpp name, in the GGUF layout and type."""
    cfg = model.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    state = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp computes it from the rope base
        if tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the LM head when the file has no output tensor
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {key} has no llama.cpp name: the GGUF writer knows the stock llama layout only")
        value = value.detach().float()
        if ".self_attn.q_proj." in key:
            value = permute_rotary(value, cfg.num_attention_heads)
        elif ".self_attn.k_proj." in key:
            value = permute_rotary(value, kv_heads(cfg))
        qtype = tensor_type(name, tuple(value.shape), quant, dtype)
        out.append(GGUFTensor(name, key, gguf.quants.quantize(value.contiguous().numpy(), qtype), qtype,
                              tuple(value.shape)))
    return out


# ------------------------------------------------------------------------------------------------ tokenizer


def _string_list(key: str, values: list[str]) -> KV:
    return KV(key, values, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)


def _pre_tokenizer(spec: dict | None) -> str | None:
    """llama.cpp's name for the split a byte-level tokenizer.json describes (None: not one llama.cpp names).

    The names are llama.cpp's (src/llama-vocab.cpp): "gpt-2" with a hyphen (a file saying "gpt2" fails to load:
    "unknown pre-tokenizer type"), "smollm"."""
    def byte_level(step):
        return step.get("type") == "ByteLevel" and step.get("use_regex", True)

    if spec and byte_level(spec):
        return "gpt-2"  # GPT-2's regex, which ByteLevel(use_regex=True) applies
    steps = (spec or {}).get("pretokenizers") or []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1])):
        return "smollm"  # single digits, then GPT-2's regex (llama.cpp's smollm/starcoder split)
    return None


def hf_tokenizer_kvs(tokenizer, cfg) -> tuple[list[KV], list[str]]:
    """tokenizer.* keys of a byte-level BPE tokenizer, as llama.cpp's converter writes them; and notes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--format gguf needs a fast tokenizer (tokenizer.json) in the run directory")
    spec = json.loads(backend.to_str())
    model, notes = spec.get("model") or {}, []
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(f"the GGUF writer builds byte-level BPE tokenizers only (GPT-2 style); this one is "
                        f"{model.get('type')!r}")
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(vocab) >= cfg.vocab_size:
        raise UserError(f"the tokenizer has token id {max(vocab)}, beyond the model's vocab_size {cfg.vocab_size}")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for index in range(cfg.vocab_size):
        token = vocab.get(index)
        if token is None:  # embedding rows without a token
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            if not added[index].normalized:  # llama.cpp matches added tokens as the text they decode to
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    u32 = gguf.GGUFValueType.UINT32
    kvs = [KV("tokenizer.ggml.model", "gpt2", gguf.GGUFValueType.STRING)]
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None:
        notes.append("tokenizer.ggml.pre: a pre-tokenizer llama.cpp does not name; it will split text its default "
                     "way")
    else:
        kvs.append(KV("tokenizer.ggml.pre", pre, gguf.GGUFValueType.STRING))
    kvs += [_string_list("tokenizer.ggml.tokens", tokens),
            KV("tokenizer.ggml.token_type", [int(t) for t in types], gguf.GGUFValueType.ARRAY,
               gguf.GGUFValueType.INT32)]
    if merges:
        kvs.append(_string_list("tokenizer.ggml.merges", merges))
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unknown": tokenizer.unk_token_id,
               "padding": tokenizer.pad_token_id}
    special["bos"] = special["bos"] if special["bos"] is not None else getattr(cfg, "bos_token_id", None)
    special["eos"] = special["eos"] if special["eos"] is not None else getattr(cfg, "eos_token_id", None)
    kvs += [KV(f"tokenizer.ggml.{what}_token_id", int(i), u32) for what, i in special.items()
            if isinstance(i, int)]
    # What the tokenizer really adds (its post-processor), so llama.cpp does the same
    with_special, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    adds_bos = len(with_special) > len(plain) and with_special[0] == special["bos"]
    adds_eos = len(with_special) > len(plain) and with_special[-1] == special["eos"]
    kvs += [KV("tokenizer.ggml.add_bos_token", bool(adds_bos), gguf.GGUFValueType.BOOL),
            KV("tokenizer.ggml.add_eos_token", bool(adds_eos), gguf.GGUFValueType.BOOL)]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        kvs.append(KV("tokenizer.chat_template", template, gguf.GGUFValueType.STRING))
    return kvs, notes


def _field_kv(field) -> KV:
    types = field.types
    return KV(field.name, field.contents(), types[0], types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None)


def donor_tokenizer_kvs(donor: Path, built: list[KV]) -> list[KV] | None:
    """Every tokenizer.* key of the GGUF file ``donor`` when its tokens and merges are the ones ``built`` from the
    run's tokenizer (it is the same tokenizer, and llama.cpp's converter chose its pre-tokenizer and token types),
    else None."""
    try:
        reader = gguf.GGUFReader(str(donor))
    except (OSError, ValueError):
        return None
    fields = {name: field for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    ours = {kv.key: kv.value for kv in built}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if (key in ours) != (key in fields) or (key in ours and fields[key].contents() != ours[key]):
            return None
    return [_field_kv(field) for field in fields.values()]


def dense_model_gguf(meta: dict) -> Path | None:
    """The GGUF file the run's dense model was read from (``default``: the shipped one), if it is still there."""
    from semisparse.models import gguf_source

    spec = meta.get("dense_model") or meta.get("source_model")
    if not isinstance(spec, str):
        return None
    try:
        found = gguf_source(spec)
    except UserError:  # the package that ships the default model is not installed
        return None
    return found[0] if found else None


def tokenizer_kvs(tokenizer, cfg, meta: dict) -> tuple[list[KV], str, list[str]]:
    """(tokenizer.* keys, where they came from, notes)."""
    built, notes = hf_tokenizer_kvs(tokenizer, cfg)
    donor = dense_model_gguf(meta)
    copied = donor_tokenizer_kvs(donor, built) if donor is not None else None
    if copied is not None:
        return copied, str(donor), []
    return built, "run directory", notes


# ------------------------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def atomic_file(out: Path):
    """Yields a temporary path beside ``out`` to write; then fsync, rename onto ``out``, fsync the folder. On any
    failure the temporary file is removed and ``out`` is as it was; an OSError is one line naming ``out``."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        rundir.fsync_file(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    rundir.fsync_dir(out.parent)


def write_file(path: Path, arch: str, kvs: list[KV], tensors: list[GGUFTensor]) -> None:
    writer = gguf.GGUFWriter(path, arch)
    try:
        for kv in kvs:
            writer.add_key_value(kv.key, kv.value, kv.type, kv.sub_type)
        for t in tensors:
            # Block types and BF16 arrive as bytes: the writer derives the element shape from raw_dtype.
            writer.add_tensor(t.name, t.data, raw_dtype=None if t.type in (_Q.F16, _Q.F32) else t.type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _sizes(tensors: list[GGUFTensor], masks: dict) -> dict:
    sparse = {f"{layer}.weight" for layer in masks}
    sparse_tensors = [t for t in tensors if t.source in sparse]
    return {"sparse_layers": {"count": len(sparse_tensors),
                              "weights": sum(int(np.prod(t.shape)) for t in sparse_tensors),
                              "bytes": sum(t.data.nbytes for t in sparse_tensors)},
            "tensor_bytes": sum(t.data.nbytes for t in tensors)}


def export_gguf(run_dir: Path, out: Path, dtype: str, quant: str, merge_slorb: bool, overwrite: bool) -> dict:
    """``export_run`` for --format gguf (options already checked): one GGUF file at ``out``; returns the record that
    is also stored in the file under ``semisparse.export``, plus ``files`` and ``out``."""
    from semisparse.rundir import sha256_file
    from semisparse.export.source import read_source
    from semisparse.export.writer import refuse_unmerged_slorb
    from semisparse.models import package_versions

    model_type = check_architecture(run_dir)
    check_target(run_dir, out, overwrite)
    has_slorb = (run_dir / rundir.SLORB_FILE).is_file()
    if has_slorb and not merge_slorb:
        refuse_unmerged_slorb(run_dir, "a GGUF file (llama.cpp)")
    source = read_source(run_dir)
    record: dict = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "options": {"format": "gguf", "dtype": dtype, "quant": quant, "merge_slorb": merge_slorb},
        "pattern": str(source.pattern), "nm": True, "dtype": dtype,
        "quantization": {"scheme": quant, "method": "rtn", "block": 32} if quant != "none" else {"scheme": "none"},
        "slorb": None,
    }
    if source.slorb:
        from semisparse.export.hf import merge_slorb as merge

        record["slorb"] = {"layers": len(merge(source)), "merged": True}
        record["nm"] = False
    cfg, arch = source.model.config, ARCHITECTURES[model_type]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    kvs = architecture_kvs(cfg, arch_name)  # every check that can refuse the model runs before the file is opened
    tok_kvs, tokenizer_from, notes = tokenizer_kvs(source.tokenizer, cfg, source.meta)
    tensors = model_tensors(source.model, arch, quant, dtype)
    main_type = collections.Counter(t.type for t in tensors if len(t.shape) == 2).most_common(1)[0][0]
    record.update(
        tensors={t.name: t.type.name for t in tensors}, sizes=_sizes(tensors, source.masks),
        tokenizer=tokenizer_from, notes=notes, tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        source={"run_dir": str(run_dir.resolve()), "meta": source.meta},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), versions=package_versions(),
    )
    s, u32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    general = [KV("general.type", "model", s), KV("general.name", run_dir.resolve().name, s),
               KV("general.file_type", int(_FILE_TYPES[main_type]), u32),
               KV("general.quantization_version", gguf.GGML_QUANT_VERSION, u32)]
    provenance = [KV(PROVENANCE_KEY, json.dumps(record), s)]
    with atomic_file(out) as tmp:
        write_file(tmp, arch_name, general + kvs + tok_kvs + provenance, tensors)
    files = {out.name: {"bytes": out.stat().st_size, "sha256": sha256_file(out)}}
    return {**record, "model_config": json.loads(cfg.to_json_string(use_diff=False)), "files": files,
            "out": str(out)}
