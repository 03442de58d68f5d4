"""Type stubs for driftscope._C (csrc/bindings.cpp). Tensors cross as raw pointers: pass
`tensor.data_ptr()` (int) of a contiguous CPU tensor of the documented dtype, plus sizes; the Python
launchers in driftscope/kernels/ check shapes, dtypes and contiguity first. 0 means "absent"."""

def has_openmp() -> bool: ...
def omp_max_threads() -> int: ...
def pool_spin_us() -> int: ...
def pool_count(counts: int, n: int, threads: int, jobs: int) -> None:
    """The decode pool's contract, for tests: `jobs` jobs of n tasks, task i adding 1 to counts[i] (int64 [n])."""

class VocabFold:
    """Running per-row vocabulary-probe state over fp32 logits tiles (csrc/vocab_probe.h)."""

    def __init__(self, n_rows: int, topk: int) -> None: ...
    @property
    def n_rows(self) -> int: ...
    @property
    def topk(self) -> int: ...
    def fold(
        self,
        zb: int,  # [rows, ld] fp32 base logits tile
        zt: int,  # [rows, ld] fp32 tuned logits tile
        ld: int,
        rows: int,
        cols: int,
        row0: int,
        col0: int,
        targets: int,  # [N] int64 or 0
        zpre_b: int,  # [N] fp32 pre-known base target logits or 0
        zpre_t: int,  # [N] fp32 pre-known tuned target logits or 0
    ) -> None: ...
    def finalize(
        self,
        out_f: int,  # [len(float_fields()), N] fp32 out, one row per field in that order
        out_i: int,  # [len(int_fields()), N] int64 out
    ) -> None: ...
    @staticmethod
    def float_fields() -> list[str]: ...
    @staticmethod
    def int_fields() -> list[str]: ...
    def tuned_top(self, row0: int, rows: int, top_t: int, zb_at_top_t: int, shift_top: int) -> None: ...

def count_greater(
    z: int,  # [rows, ld] fp32
    ld: int,
    rows: int,
    cols: int,
    col0: int,
    thr: int,  # [rows] fp32
    excl: int,  # [rows] int64, -1 = no excluded id
    active: int,  # [rows] uint8
    out: int,  # [rows] int64, incremented
) -> None: ...
def cov_update(
    sum_x: int,  # [d] float64, in place
    sum_xxT: int,  # [d, d] float64, in place (stays exactly symmetric)
    x: int,  # [n, d] float32 or float64 rows, row stride ld, unit column stride
    n: int,
    d: int,
    ld: int,
    elem_bytes: int,  # 4 (float32) or 8 (float64)
) -> None: ...
def varlen_attention(
    out: int,  # [T, Hq, D] fp32 contiguous
    q: int,  # [T, Hq, D] fp32, rows sq floats apart, heads D apart
    k: int,  # [T, Hkv, D] fp32, rows sk floats apart
    v: int,  # [T, Hkv, D] fp32, rows sv floats apart
    cu_seqlens: int,  # [B+1] int32
    B: int,
    Hq: int,
    Hkv: int,
    D: int,  # a multiple of varlen_attention_lanes()
    sq: int,
    sk: int,
    sv: int,
    scale: float,
    window: int = 0,  # > 0: keys i - window < j <= i
) -> None: ...
def varlen_attention_lanes() -> int: ...
def paged_decode_attention(
    out: int, q: int, k_cache: int, v_cache: int, block_tables: int, context_lens: int, B: int, M: int, Hq: int,
    Hkv: int, D: int, block_size: int, num_slots: int, scale: float, window: int = 0,
    ldq: int = 0,  # floats between two sequences' queries; 0: Hq·D
) -> None: ...
def rms_norm(out: int, x: int, w: int, rows: int, d: int, ldx: int, eps: float) -> None: ...
def add_rms_norm(res: int, out: int, h: int, a: int, w: int, rows: int, d: int, eps: float) -> None: ...
def silu_mul(out: int, gu: int, rows: int, inter: int) -> None: ...
def rope_cache_write(
    qkv: int, cos: int, sin: int, k_cache: int, v_cache: int, slots: int,  # slots: [T] int64
    T: int, Hq: int, Hkv: int, D: int, R: int, num_slots: int,
) -> None: ...
