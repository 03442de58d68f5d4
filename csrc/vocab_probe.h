// Fused CPU fold for driftscope.kernels.vocab_probe: running per-row state over vocabulary chunks.
// Contract: the caller (driftscope/kernels/vocab_probe/cpp.py) computes one [rows, cols] fp32 logits tile
// per source with torch (BLAS) and hands them here while they are hot in cache; tensors cross as raw
// pointers (uintptr_t from tensor.data_ptr()) plus sizes, the launcher guarantees dtype/contiguity.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace driftscope {

// Many pairs over shared sources: each fold() call gets one logits tile per source; the per-source state (maxima,
// softmax sums, target counts, top-k list) is folded once per tile whatever the number of pairs reading that
// source, each pair adds only its KL sums. A pair's results depend on its two sources alone, so a single pair
// ({(0, 1)} over 2 sources) gives the same bits as that pair among any others.
class VocabFold {
 public:
  // n_rows: N tokens; topk: size of the per-row list of the largest logits of each base-side source
  // (rank_shift_top); pairs: (a, b) = (base side, tuned side) indices into the sources (n_sources = max + 1).
  VocabFold(int64_t n_rows, int64_t topk, std::vector<std::pair<int64_t, int64_t>> pairs);
  ~VocabFold();  // defined where Src and Pair are complete

  // Fold one tile per source: zs[s] [rows, cols] fp32 with row stride ld, covering token rows [row0, row0+rows)
  // and vocabulary ids [col0, col0+cols). Chunks must arrive in increasing col0 for every row (argmax tie rule:
  // lowest id). targets: [N] int64 or 0; zpre[s]: [N] fp32 target logits known before the scan (ignored when
  // targets is 0).
  void fold(const std::vector<uintptr_t>& zs, int64_t ld, int64_t rows, int64_t cols, int64_t row0, int64_t col0,
            uintptr_t targets, const std::vector<uintptr_t>& zpre);

  // Write pair p's per-row results: out_f [len(float_fields()), N] fp32 and out_i [len(int_fields()), N] int64,
  // one row per named field in that order (see VocabFold::finalize in vocab_probe.cpp for the fields).
  void finalize(int64_t pair, uintptr_t out_f, uintptr_t out_i) const;
  static std::vector<std::string> float_fields();
  static std::vector<std::string> int_fields();

  // For pair p's rows [row0, row0+rows) once all their chunks are folded: the tuned top-1, the base logit there
  // as scanned, and rank_shift_top from the top-k list or -1 (all [rows], pointers at the first row).
  void tuned_top(int64_t pair, int64_t row0, int64_t rows, uintptr_t top_t, uintptr_t zb_at_top_t,
                 uintptr_t shift_top) const;

  int64_t n_rows() const { return n_; }
  int64_t topk() const { return k_; }
  int64_t n_sources() const { return ns_; }
  int64_t n_pairs() const { return static_cast<int64_t>(pairs_.size()); }

 private:
  struct Src;   // one (source, token) running state, defined in vocab_probe.cpp
  struct Pair;  // one (pair, token) running state: the KL sums and the base logit at the tuned top-1
  int64_t shift_of(int64_t p, int64_t g) const;
  void check_pair(int64_t p, const char* where) const;
  int64_t n_, k_, ns_;
  std::vector<std::pair<int64_t, int64_t>> pairs_;
  std::vector<int64_t> list_of_;  // source -> its top-k list's index, -1 when no pair has it on the base side
  std::vector<Src> src_;          // [ns, N]
  std::vector<Pair> pair_;        // [pairs, N]
  std::vector<float> topk_;       // [lists, N, k] largest logits per row, sorted descending
};

// Pass-2 helper: out[r] += #{c : z[r, c] > thr[r] and col0 + c != excl[r]} for rows with active[r].
// z [rows, cols] fp32 (row stride ld); thr [rows] fp32; excl [rows] int64 (-1: none); active [rows]
// uint8; out [rows] int64. Pointers are already offset to the tile's first row.
void count_greater(uintptr_t z, int64_t ld, int64_t rows, int64_t cols, int64_t col0, uintptr_t thr,
                   uintptr_t excl, uintptr_t active, uintptr_t out);

}  // namespace driftscope
