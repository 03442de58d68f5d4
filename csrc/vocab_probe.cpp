// Fused CPU fold for driftscope.kernels.vocab_probe (see vocab_probe.h for the calling contract).
//
// Per row and model the state is the online softmax of the logits seen so far, kept relative to
// the running max m (so logits of magnitude 1e4 never cancel):
//   s = Σ e^{z-m},  a = Σ e^{z-m}(z-m)                      -> lse = m + log s, H = log s - a/s
//   k_tb = Σ e^{zt-mt}((zt-mt) - (zb-mb)), k_bt symmetric   -> KL(p‖q) = k_tb/s_t - log s_t + log s_b
// When a max moves (m -> M, δ = m - M ≤ 0): s <- e^δ s, a <- e^δ (a + δ s), and the KL sums take
// the shift of both maxima, e.g. k_tb <- e^{δt}(k_tb + (δt - δb) s_t). Inside a tile the terms are
// summed in fp32 SIMD lanes (≤ cols/16 terms each) and added to the fp64 state once per tile.
// Ranks count strictly larger logits against a target logit known before the scan (zpre); the
// launcher checks that zpre is bitwise the scanned value (zy) and recounts rows where it is not.
#include "vocab_probe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>

#include "common.h"

namespace driftscope {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t first_index_of(const float* z, int64_t cols, float v) {
  for (int64_t c = 0; c < cols; ++c)
    if (z[c] == v) return c;
  return 0;  // unreachable for a max taken over the same values
}

}  // namespace

struct VocabFold::Row {
  double m_b, s_b, a_b, m_t, s_t, a_t, k_tb, k_bt;  // running max, Σe^{z-m}, Σe^{z-m}(z-m), KL sums
  float top_v_b, top_v_t, zb_at_top_t, zy_b, zy_t;
  int64_t top_b, top_t, gt_b, gt_t, nk;  // argmaxes, counts above the target, filled top-k slots
};

VocabFold::~VocabFold() = default;

VocabFold::VocabFold(int64_t n_rows, int64_t topk) : n_(n_rows), k_(topk) {
  check(n_rows >= 0, "VocabFold: n_rows must be >= 0, got " + std::to_string(n_rows));
  check(topk >= 1 && topk <= 4096, "VocabFold: topk must be in [1, 4096], got " + std::to_string(topk));
  Row init{};
  init.m_b = init.m_t = -std::numeric_limits<double>::infinity();
  init.top_v_b = init.top_v_t = kNegInf;
  init.zb_at_top_t = init.zy_b = init.zy_t = std::numeric_limits<float>::quiet_NaN();
  rows_.assign(static_cast<size_t>(n_rows), init);
  topk_.assign(static_cast<size_t>(n_rows * topk), kNegInf);
}

void VocabFold::fold(uintptr_t zb, uintptr_t zt, int64_t ld, int64_t rows, int64_t cols, int64_t row0,
                     int64_t col0, uintptr_t targets, uintptr_t zpre_b, uintptr_t zpre_t) {
  check(zb != 0 && zt != 0, "VocabFold.fold: zb and zt must be non-null");
  check(cols >= 1 && ld >= cols, "VocabFold.fold: need 1 <= cols <= ld, got cols=" + std::to_string(cols) +
                                     " ld=" + std::to_string(ld));
  check(row0 >= 0 && rows >= 0 && row0 + rows <= n_,
        "VocabFold.fold: rows [" + std::to_string(row0) + ", " + std::to_string(row0 + rows) +
            ") out of range for n_rows=" + std::to_string(n_));
  check(col0 >= 0, "VocabFold.fold: col0 must be >= 0");
  check(!targets || (zpre_b && zpre_t), "VocabFold.fold: targets given without zpre_b/zpre_t");
  const float* B = reinterpret_cast<const float*>(zb);
  const float* T = reinterpret_cast<const float*>(zt);
  const int64_t* tg = reinterpret_cast<const int64_t*>(targets);
  const float* pb = reinterpret_cast<const float*>(zpre_b);
  const float* pt = reinterpret_cast<const float*>(zpre_t);
  const int64_t K = k_;

#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = row0 + r;
    Row& st = rows_[g];
    const float* b = B + r * ld;
    const float* t = T + r * ld;

    // 1. tile maxima; argmax keeps the lowest id (strict > across tiles, first index inside one). Written as
    // `m > z ? m : z` (a NaN logit propagates, as in torch): GCC vectorizes this form, not std::max (7x slower).
    float mb = kNegInf, mt = kNegInf;
#pragma omp simd reduction(max : mb, mt)
    for (int64_t c = 0; c < cols; ++c) {
      mb = mb > b[c] ? mb : b[c];
      mt = mt > t[c] ? mt : t[c];
    }
    if (mb > st.top_v_b) {
      st.top_v_b = mb;
      st.top_b = col0 + first_index_of(b, cols, mb);
    }
    if (mt > st.top_v_t) {
      const int64_t c = first_index_of(t, cols, mt);
      st.top_v_t = mt;
      st.top_t = col0 + c;
      st.zb_at_top_t = b[c];  // the base logit of the (running) tuned top-1, as scanned
    }

    // 2. online softmax sums relative to the new running maxima
    const bool first = st.m_b == -std::numeric_limits<double>::infinity();
    const float Mb = first ? mb : std::max(static_cast<float>(st.m_b), mb);
    const float Mt = first ? mt : std::max(static_cast<float>(st.m_t), mt);
    float seb = 0.f, set = 0.f, sab = 0.f, sat = 0.f, sktb = 0.f, skbt = 0.f;
#pragma omp simd reduction(+ : seb, set, sab, sat, sktb, skbt)
    for (int64_t c = 0; c < cols; ++c) {
      const float ub = b[c] - Mb, ut = t[c] - Mt;
      const float eb = exp_nonpositive(ub), et = exp_nonpositive(ut);
      const float dv = ut - ub;
      seb += eb;
      set += et;
      sab += eb * ub;
      sat += et * ut;
      sktb += et * dv;
      skbt -= eb * dv;
    }
    const double db = first ? 0.0 : st.m_b - Mb, dt = first ? 0.0 : st.m_t - Mt;
    const double alb = first ? 0.0 : std::exp(db), alt = first ? 0.0 : std::exp(dt);
    st.a_b = alb * (st.a_b + db * st.s_b) + sab;
    st.a_t = alt * (st.a_t + dt * st.s_t) + sat;
    st.k_tb = alt * (st.k_tb + (dt - db) * st.s_t) + sktb;
    st.k_bt = alb * (st.k_bt + (db - dt) * st.s_b) + skbt;
    st.s_b = alb * st.s_b + seb;
    st.s_t = alt * st.s_t + set;
    st.m_b = Mb;
    st.m_t = Mt;

    // 3. counts of logits strictly above the pre-known target logit (target id itself excluded)
    if (tg) {
      const int64_t y = tg[g];
      const float zb_y = pb[g], zt_y = pt[g];
      int64_t cb = 0, ct = 0;
      if (mb > zb_y) {
#pragma omp simd reduction(+ : cb)
        for (int64_t c = 0; c < cols; ++c) cb += b[c] > zb_y;
      }
      if (mt > zt_y) {
#pragma omp simd reduction(+ : ct)
        for (int64_t c = 0; c < cols; ++c) ct += t[c] > zt_y;
      }
      if (y >= col0 && y < col0 + cols) {
        st.zy_b = b[y - col0];
        st.zy_t = t[y - col0];
        cb -= st.zy_b > zb_y;
        ct -= st.zy_t > zt_y;
      }
      st.gt_b += cb;
      st.gt_t += ct;
    }

    // 4. the k largest base logits (values only), sorted descending; strict > keeps the multiset exact
    float* tk = topk_.data() + g * K;
    if (st.nk < K || mb > tk[K - 1]) {
      for (int64_t c = 0; c < cols; ++c) {
        const float v = b[c];
        if (st.nk == K && !(v > tk[K - 1])) continue;
        int64_t pos = st.nk < K ? st.nk++ : K - 1;
        while (pos > 0 && tk[pos - 1] < v) {
          tk[pos] = tk[pos - 1];
          --pos;
        }
        tk[pos] = v;
      }
    }
  }
}

// rank_shift_top from the top-k list: 1 + #{top-k values > base logit of the tuned top-1} when that logit is >=
// the k-th largest base logit (then every larger logit is in the list), else -1 (the caller counts it).
int64_t VocabFold::shift_of(int64_t g) const {
  const Row& st = rows_[g];
  const float* tk = topk_.data() + g * k_;
  const float thr = st.zb_at_top_t;
  if (st.nk < k_ || thr >= tk[k_ - 1]) {
    int64_t above = 0;
    for (int64_t j = 0; j < st.nk; ++j) above += tk[j] > thr;
    return 1 + above;
  }
  return -1;
}

void VocabFold::tuned_top(int64_t row0, int64_t rows, uintptr_t top_t, uintptr_t zb_at_top_t,
                          uintptr_t shift_top) const {
  check(top_t && zb_at_top_t && shift_top, "VocabFold.tuned_top: output pointers must be non-null");
  check(row0 >= 0 && rows >= 0 && row0 + rows <= n_, "VocabFold.tuned_top: rows out of range");
  int64_t* tt = reinterpret_cast<int64_t*>(top_t);
  float* zt = reinterpret_cast<float*>(zb_at_top_t);
  int64_t* sh = reinterpret_cast<int64_t*>(shift_top);
  for (int64_t r = 0; r < rows; ++r) {
    tt[r] = rows_[row0 + r].top_t;
    zt[r] = rows_[row0 + r].zb_at_top_t;
    sh[r] = shift_of(row0 + r);
  }
}

// The packed outputs of finalize, one [N] row each, in enum order; kFloatNames / kIntNames name the rows for
// the launcher (VocabFold::float_fields / int_fields). A new per-row result is a row here and its line below.
namespace {
enum FloatRow { kLseB, kLseT, kEntB, kEntT, kKlTb, kKlBt, kZbTop, kZyB, kZyT, kLogpB, kLogpT, kFloatRows };
enum IntRow { kTopB, kTopT, kShift, kGtB, kGtT, kIntRows };
const char* const kFloatNames[] = {"lse_base", "lse_tuned", "entropy_base", "entropy_tuned", "kl_tb", "kl_bt",
                                   "zb_top", "zy_b", "zy_t", "logp_base", "logp_tuned"};
const char* const kIntNames[] = {"top_base", "top_tuned", "shift", "gt_b", "gt_t"};
static_assert(sizeof(kFloatNames) / sizeof(*kFloatNames) == kFloatRows, "one name per FloatRow");
static_assert(sizeof(kIntNames) / sizeof(*kIntNames) == kIntRows, "one name per IntRow");
}  // namespace

std::vector<std::string> VocabFold::float_fields() { return {std::begin(kFloatNames), std::end(kFloatNames)}; }
std::vector<std::string> VocabFold::int_fields() { return {std::begin(kIntNames), std::end(kIntNames)}; }

// lse = m + log s; entropy = log s - a/s; KL as in the file comment; shift as shift_of (-1: the launcher counts
// those rows, from its stored base panel or in a second pass); zb_top: the base logit at the tuned top-1; zy_*:
// the scanned target logits, gt_*: the counts above zpre_* (NaN and 0 when no targets were folded).
void VocabFold::finalize(uintptr_t out_f, uintptr_t out_i) const {
  check(out_f && out_i, "VocabFold.finalize: out_f and out_i must be non-null");
  float* F = reinterpret_cast<float*>(out_f);
  int64_t* I = reinterpret_cast<int64_t*>(out_i);
  const int64_t n = n_;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < n; ++g) {
    const Row& st = rows_[g];
    const double lsb = std::log(st.s_b), lst = std::log(st.s_t);
    F[kLseB * n + g] = static_cast<float>(st.m_b + lsb);
    F[kLseT * n + g] = static_cast<float>(st.m_t + lst);
    F[kEntB * n + g] = static_cast<float>(lsb - st.a_b / st.s_b);
    F[kEntT * n + g] = static_cast<float>(lst - st.a_t / st.s_t);
    F[kKlTb * n + g] = static_cast<float>(st.k_tb / st.s_t - lst + lsb);
    F[kKlBt * n + g] = static_cast<float>(st.k_bt / st.s_b - lsb + lst);
    F[kZbTop * n + g] = st.zb_at_top_t;
    F[kZyB * n + g] = st.zy_b;
    F[kZyT * n + g] = st.zy_t;
    // log-prob relative to the max: (z_y - m) - log s, never z_y - lse (lse ~1e4 would round it)
    F[kLogpB * n + g] = static_cast<float>((static_cast<double>(st.zy_b) - st.m_b) - lsb);
    F[kLogpT * n + g] = static_cast<float>((static_cast<double>(st.zy_t) - st.m_t) - lst);
    I[kTopB * n + g] = st.top_b;
    I[kTopT * n + g] = st.top_t;
    I[kShift * n + g] = shift_of(g);
    I[kGtB * n + g] = st.gt_b;
    I[kGtT * n + g] = st.gt_t;
  }
}

void count_greater(uintptr_t z, int64_t ld, int64_t rows, int64_t cols, int64_t col0, uintptr_t thr,
                   uintptr_t excl, uintptr_t active, uintptr_t out) {
  check(z && thr && excl && active && out, "count_greater: pointers must be non-null");
  check(cols >= 1 && ld >= cols, "count_greater: need 1 <= cols <= ld");
  check(rows >= 0, "count_greater: rows must be >= 0");
  const float* Z = reinterpret_cast<const float*>(z);
  const float* th = reinterpret_cast<const float*>(thr);
  const int64_t* ex = reinterpret_cast<const int64_t*>(excl);
  const uint8_t* ac = reinterpret_cast<const uint8_t*>(active);
  int64_t* o = reinterpret_cast<int64_t*>(out);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    if (!ac[r]) continue;
    const float* zr = Z + r * ld;
    const float v = th[r];
    int64_t cnt = 0;
#pragma omp simd reduction(+ : cnt)
    for (int64_t c = 0; c < cols; ++c) cnt += zr[c] > v;
    const int64_t e = ex[r] - col0;
    if (e >= 0 && e < cols) cnt -= zr[e] > v;
    o[r] += cnt;
  }
}

}  // namespace driftscope
