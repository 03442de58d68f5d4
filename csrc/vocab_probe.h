// Fused CPU fold for driftscope.kernels.vocab_probe: running per-row state over vocabulary chunks.
// Contract: the caller (driftscope/kernels/vocab_probe.py) computes one [rows, cols] fp32 logits tile
// per model with torch (BLAS) and hands it here while it is hot in cache; tensors cross as raw
// pointers (uintptr_t from tensor.data_ptr()) plus sizes, the launcher guarantees dtype/contiguity.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace driftscope {

class VocabFold {
 public:
  // n_rows: N tokens; topk: size of the per-row list of the largest base logits (rank_shift_top).
  VocabFold(int64_t n_rows, int64_t topk);
  ~VocabFold();  // defined where Row is complete

  // Fold one tile: zb/zt [rows, cols] fp32 with row stride ld, covering token rows
  // [row0, row0+rows) and vocabulary ids [col0, col0+cols). Chunks must arrive in increasing col0
  // for every row (argmax tie rule: lowest id). targets: [N] int64 or 0; zpre_b/zpre_t: [N] fp32
  // target logits known before the scan (or 0 when targets is 0).
  void fold(uintptr_t zb, uintptr_t zt, int64_t ld, int64_t rows, int64_t cols, int64_t row0,
            int64_t col0, uintptr_t targets, uintptr_t zpre_b, uintptr_t zpre_t);

  // Write the per-row results: out_f [len(float_fields()), N] fp32 and out_i [len(int_fields()), N] int64, one
  // row per named field in that order (see VocabFold::finalize in vocab_probe.cpp for the fields).
  void finalize(uintptr_t out_f, uintptr_t out_i) const;
  static std::vector<std::string> float_fields();
  static std::vector<std::string> int_fields();

  // For rows [row0, row0+rows) once all their chunks are folded: the tuned top-1, the base logit there as
  // scanned, and rank_shift_top from the top-k list or -1 (all [rows], pointers at the first row).
  void tuned_top(int64_t row0, int64_t rows, uintptr_t top_t, uintptr_t zb_at_top_t, uintptr_t shift_top) const;

  int64_t n_rows() const { return n_; }
  int64_t topk() const { return k_; }

 private:
  struct Row;  // one token's running state, defined in vocab_probe.cpp (a new metric's state goes there)
  int64_t shift_of(int64_t g) const;
  int64_t n_, k_;
  std::vector<Row> rows_;
  std::vector<float> topk_;  // [N, k] largest base logits per row, sorted descending
};

// Pass-2 helper: out[r] += #{c : z[r, c] > thr[r] and col0 + c != excl[r]} for rows with active[r].
// z [rows, cols] fp32 (row stride ld); thr [rows] fp32; excl [rows] int64 (-1: none); active [rows]
// uint8; out [rows] int64. Pointers are already offset to the tile's first row.
void count_greater(uintptr_t z, int64_t ld, int64_t rows, int64_t cols, int64_t col0, uintptr_t thr,
                   uintptr_t excl, uintptr_t active, uintptr_t out);

}  // namespace driftscope
