"""Type stubs for driftscope._C (csrc/bindings.cpp). Tensors cross as raw pointers: pass
`tensor.data_ptr()` (int) of a contiguous CPU tensor of the documented dtype, plus sizes; the Python
launchers in driftscope/kernels/ check shapes, dtypes and contiguity first. 0 means "absent"."""

def has_openmp() -> bool: ...
def omp_max_threads() -> int: ...

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
        lse_b: int,  # [N] fp32 out
        lse_t: int,  # [N] fp32 out
        ent_b: int,  # [N] fp32 out
        ent_t: int,  # [N] fp32 out
        kl_tb: int,  # [N] fp32 out
        kl_bt: int,  # [N] fp32 out
        top_b: int,  # [N] int64 out
        top_t: int,  # [N] int64 out
        zb_at_top_t: int,  # [N] fp32 out: base logit at the tuned top-1
        shift_top: int,  # [N] int64 out: rank_shift_top, -1 where the top-k cannot decide
        zy_b: int,  # [N] fp32 out (scanned target logits) or 0
        zy_t: int,  # [N] fp32 out or 0
        gt_b: int,  # [N] int64 out (#{v != y: z_b > zpre_b}) or 0
        gt_t: int,  # [N] int64 out or 0
        logp_b: int,  # [N] fp32 out: (z_y - m) - log s, or 0
        logp_t: int,  # [N] fp32 out or 0
    ) -> None: ...

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
    sum_xxT: int,  # [d, d] float64, in place
    xT: int,  # [d, n] float64 contiguous
    d: int,
    n: int,
) -> None: ...
