// Fused CPU fold for driftscope.kernels.vocab_probe (see vocab_probe.h for the calling contract).
//
// Per row and source the state is the online softmax of the logits seen so far, kept relative to
// the running max m (so logits of magnitude 1e4 never cancel):
//   s = Σ e^{z-m},  a = Σ e^{z-m}(z-m)                      -> lse = m + log s, H = log s - a/s
// and per row and pair (base side b, tuned side t) the KL sums
//   k_tb = Σ e^{zt-mt}((zt-mt) - (zb-mb)), k_bt symmetric   -> KL(p‖q) = k_tb/s_t - log s_t + log s_b
// When a max moves (m -> M, δ = m - M ≤ 0): s <- e^δ s, a <- e^δ (a + δ s), and the KL sums take
// the shift of both maxima, e.g. k_tb <- e^{δt}(k_tb + (δt - δb) s_t). A tile row is folded in blocks of
// kBlock columns: each source's exps once per block into a scratch row (in L1), every pair's KL terms from
// those; terms are summed in fp32 SIMD lanes within a block and added to the fp64 state once per block.
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
constexpr int64_t kBlock = 512;  // columns per block: a 2 KiB logits row and its exps per source stay in L1

inline int64_t first_index_of(const float* z, int64_t cols, float v) {
  for (int64_t c = 0; c < cols; ++c)
    if (z[c] == v) return c;
  return 0;  // unreachable for a max taken over the same values
}

}  // namespace

struct VocabFold::Src {
  double m, s, a;  // running max, Σe^{z-m}, Σe^{z-m}(z-m)
  float top_v, zy;  // running max as scanned, the scanned target logit
  int64_t top, gt, nk;  // argmax, count above the target, filled top-k slots
};

struct VocabFold::Pair {
  double k_tb, k_bt;
  float zb_at_top_t;  // the base side's logit at the tuned side's (running) top-1, as scanned
};

VocabFold::~VocabFold() = default;

VocabFold::VocabFold(int64_t n_rows, int64_t topk, std::vector<std::pair<int64_t, int64_t>> pairs)
    : n_(n_rows), k_(topk), ns_(0), pairs_(std::move(pairs)) {
  check(n_rows >= 0, "VocabFold: n_rows must be >= 0, got " + std::to_string(n_rows));
  check(topk >= 1 && topk <= 4096, "VocabFold: topk must be in [1, 4096], got " + std::to_string(topk));
  check(!pairs_.empty(), "VocabFold: pairs must not be empty");
  for (const auto& [a, b] : pairs_) {
    check(a >= 0 && b >= 0, "VocabFold: pair (" + std::to_string(a) + ", " + std::to_string(b) +
                                ") has a negative source index");
    ns_ = std::max({ns_, a + 1, b + 1});
  }
  list_of_.assign(static_cast<size_t>(ns_), -1);
  int64_t lists = 0;
  for (const auto& pr : pairs_)
    if (list_of_[pr.first] < 0) list_of_[pr.first] = lists++;
  Src s0{};
  s0.m = -std::numeric_limits<double>::infinity();
  s0.top_v = kNegInf;
  s0.zy = std::numeric_limits<float>::quiet_NaN();
  src_.assign(static_cast<size_t>(ns_ * n_rows), s0);
  Pair p0{};
  p0.zb_at_top_t = std::numeric_limits<float>::quiet_NaN();
  pair_.assign(pairs_.size() * static_cast<size_t>(n_rows), p0);
  topk_.assign(static_cast<size_t>(lists * n_rows * topk), kNegInf);
}

void VocabFold::fold(const std::vector<uintptr_t>& zs, int64_t ld, int64_t rows, int64_t cols, int64_t row0,
                     int64_t col0, uintptr_t targets, const std::vector<uintptr_t>& zpre) {
  check(static_cast<int64_t>(zs.size()) == ns_, "VocabFold.fold: expected " + std::to_string(ns_) +
                                                    " source tiles, got " + std::to_string(zs.size()));
  for (uintptr_t z : zs) check(z != 0, "VocabFold.fold: source tiles must be non-null");
  check(cols >= 1 && ld >= cols, "VocabFold.fold: need 1 <= cols <= ld, got cols=" + std::to_string(cols) +
                                     " ld=" + std::to_string(ld));
  check(row0 >= 0 && rows >= 0 && row0 + rows <= n_,
        "VocabFold.fold: rows [" + std::to_string(row0) + ", " + std::to_string(row0 + rows) +
            ") out of range for n_rows=" + std::to_string(n_));
  check(col0 >= 0, "VocabFold.fold: col0 must be >= 0");
  if (targets) {
    check(static_cast<int64_t>(zpre.size()) == ns_, "VocabFold.fold: targets given without one zpre per source");
    for (uintptr_t z : zpre) check(z != 0, "VocabFold.fold: targets given with a null zpre");
  }
  const int64_t* tg = reinterpret_cast<const int64_t*>(targets);
  const int64_t K = k_, ns = ns_, np = static_cast<int64_t>(pairs_.size()), n = n_;

#pragma omp parallel
  {
    // per-thread scratch: each source's exps of one block, and the per-source and per-pair values of one row
    std::vector<float> ex(static_cast<size_t>(ns * kBlock)), mz(ns), M(ns);
    std::vector<double> dl(ns), al(ns), se(ns), sa(ns), k1(np), k2(np);
    std::vector<int64_t> cnt(ns), ctop(ns);
    std::vector<const float*> zr(ns);
    std::vector<float> zyp(ns);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = row0 + r;
      const int64_t y = tg ? tg[g] : -1;
      for (int64_t s = 0; s < ns; ++s) {
        Src& st = src_[s * n + g];
        const float* z = reinterpret_cast<const float*>(zs[s]) + r * ld;
        zr[s] = z;
        // 1. tile maximum; argmax keeps the lowest id (strict > across tiles, first index inside one). Written as
        // `m > z ? m : z` (a NaN logit propagates, as in torch): GCC vectorizes this form, not std::max (7x slower).
        float m = kNegInf;
#pragma omp simd reduction(max : m)
        for (int64_t c = 0; c < cols; ++c) m = m > z[c] ? m : z[c];
        mz[s] = m;
        ctop[s] = -1;
        if (m > st.top_v) {
          ctop[s] = first_index_of(z, cols, m);
          st.top_v = m;
          st.top = col0 + ctop[s];
        }
        const bool first = st.m == -std::numeric_limits<double>::infinity();
        M[s] = first ? m : std::max(static_cast<float>(st.m), m);
        dl[s] = first ? 0.0 : st.m - M[s];
        al[s] = first ? 0.0 : std::exp(dl[s]);
        se[s] = sa[s] = 0.0;
        cnt[s] = 0;
        zyp[s] = tg ? reinterpret_cast<const float*>(zpre[s])[g] : 0.f;
      }
      for (int64_t p = 0; p < np; ++p) {
        k1[p] = k2[p] = 0.0;
        const auto [a, b] = pairs_[p];
        if (ctop[b] >= 0) pair_[p * n + g].zb_at_top_t = zr[a][ctop[b]];  // the base logit there, as scanned
      }

      // 2. per block: each source's exps relative to its new running max (softmax sums, and the count of logits
      // strictly above the pre-known target logit), then every pair's KL terms from the stored exps
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t w = std::min(kBlock, cols - c0);
        for (int64_t s = 0; s < ns; ++s) {
          const float* z = zr[s] + c0;
          float* e = ex.data() + s * kBlock;
          const float Ms = M[s];
          float bs = 0.f, ba = 0.f;
#pragma omp simd reduction(+ : bs, ba)
          for (int64_t c = 0; c < w; ++c) {
            const float u = z[c] - Ms;
            const float v = exp_nonpositive(u);
            e[c] = v;
            bs += v;
            ba += v * u;
          }
          se[s] += bs;
          sa[s] += ba;
          if (tg && mz[s] > zyp[s]) {
            const float thr = zyp[s];
            int32_t k = 0;  // <= kBlock: 8 lanes of int32 per AVX2 vector where int64 has 4
#pragma omp simd reduction(+ : k)
            for (int64_t c = 0; c < w; ++c) k += z[c] > thr;
            cnt[s] += k;
          }
        }
        for (int64_t p = 0; p < np; ++p) {
          const auto [a, b] = pairs_[p];
          const float *zb = zr[a] + c0, *zt = zr[b] + c0;
          const float *eb = ex.data() + a * kBlock, *et = ex.data() + b * kBlock;
          const float Mb = M[a], Mt = M[b];
          float ktb = 0.f, kbt = 0.f;
#pragma omp simd reduction(+ : ktb, kbt)
          for (int64_t c = 0; c < w; ++c) {
            const float dv = (zt[c] - Mt) - (zb[c] - Mb);
            ktb += et[c] * dv;
            kbt -= eb[c] * dv;
          }
          k1[p] += ktb;
          k2[p] += kbt;
        }
      }

      // 3. commit: the pairs first (they rescale with the sources' old sums), then the sources
      for (int64_t p = 0; p < np; ++p) {
        const auto [a, b] = pairs_[p];
        Pair& pr = pair_[p * n + g];
        const double sb = src_[a * n + g].s, st = src_[b * n + g].s;
        pr.k_tb = al[b] * (pr.k_tb + (dl[b] - dl[a]) * st) + k1[p];
        pr.k_bt = al[a] * (pr.k_bt + (dl[a] - dl[b]) * sb) + k2[p];
      }
      for (int64_t s = 0; s < ns; ++s) {
        Src& st = src_[s * n + g];
        st.a = al[s] * (st.a + dl[s] * st.s) + sa[s];
        st.s = al[s] * st.s + se[s];
        st.m = M[s];
        const float* z = zr[s];
        if (tg) {  // the target id itself is excluded from its count
          if (y >= col0 && y < col0 + cols) {
            st.zy = z[y - col0];
            cnt[s] -= st.zy > zyp[s];
          }
          st.gt += cnt[s];
        }

        // 4. the k largest logits of a base-side source (values only), sorted descending; strict > keeps the
        // multiset exact
        if (list_of_[s] < 0) continue;
        float* tk = topk_.data() + (list_of_[s] * n + g) * K;
        if (st.nk < K || mz[s] > tk[K - 1]) {
          for (int64_t c = 0; c < cols; ++c) {
            const float v = z[c];
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
  }
}

void VocabFold::check_pair(int64_t p, const char* where) const {
  check(p >= 0 && p < static_cast<int64_t>(pairs_.size()),
        std::string(where) + ": pair " + std::to_string(p) + " out of range for " + std::to_string(pairs_.size()));
}

// rank_shift_top from the top-k list: 1 + #{top-k values > base logit of the tuned top-1} when that logit is >=
// the k-th largest base logit (then every larger logit is in the list), else -1 (the caller counts it).
int64_t VocabFold::shift_of(int64_t p, int64_t g) const {
  const int64_t a = pairs_[p].first;
  const Src& st = src_[a * n_ + g];
  const float* tk = topk_.data() + (list_of_[a] * n_ + g) * k_;
  const float thr = pair_[p * n_ + g].zb_at_top_t;
  if (st.nk < k_ || thr >= tk[k_ - 1]) {
    int64_t above = 0;
    for (int64_t j = 0; j < st.nk; ++j) above += tk[j] > thr;
    return 1 + above;
  }
  return -1;
}

void VocabFold::tuned_top(int64_t pair, int64_t row0, int64_t rows, uintptr_t top_t, uintptr_t zb_at_top_t,
                          uintptr_t shift_top) const {
  check_pair(pair, "VocabFold.tuned_top");
  check(top_t && zb_at_top_t && shift_top, "VocabFold.tuned_top: output pointers must be non-null");
  check(row0 >= 0 && rows >= 0 && row0 + rows <= n_, "VocabFold.tuned_top: rows out of range");
  int64_t* tt = reinterpret_cast<int64_t*>(top_t);
  float* zt = reinterpret_cast<float*>(zb_at_top_t);
  int64_t* sh = reinterpret_cast<int64_t*>(shift_top);
  const int64_t b = pairs_[pair].second;
  for (int64_t r = 0; r < rows; ++r) {
    tt[r] = src_[b * n_ + row0 + r].top;
    zt[r] = pair_[pair * n_ + row0 + r].zb_at_top_t;
    sh[r] = shift_of(pair, row0 + r);
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
void VocabFold::finalize(int64_t pair, uintptr_t out_f, uintptr_t out_i) const {
  check_pair(pair, "VocabFold.finalize");
  check(out_f && out_i, "VocabFold.finalize: out_f and out_i must be non-null");
  float* F = reinterpret_cast<float*>(out_f);
  int64_t* I = reinterpret_cast<int64_t*>(out_i);
  const int64_t n = n_, a = pairs_[pair].first, b = pairs_[pair].second;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < n; ++g) {
    const Src &sb = src_[a * n + g], &stt = src_[b * n + g];
    const Pair& pr = pair_[pair * n + g];
    const double lsb = std::log(sb.s), lst = std::log(stt.s);
    F[kLseB * n + g] = static_cast<float>(sb.m + lsb);
    F[kLseT * n + g] = static_cast<float>(stt.m + lst);
    F[kEntB * n + g] = static_cast<float>(lsb - sb.a / sb.s);
    F[kEntT * n + g] = static_cast<float>(lst - stt.a / stt.s);
    F[kKlTb * n + g] = static_cast<float>(pr.k_tb / stt.s - lst + lsb);
    F[kKlBt * n + g] = static_cast<float>(pr.k_bt / sb.s - lsb + lst);
    F[kZbTop * n + g] = pr.zb_at_top_t;
    F[kZyB * n + g] = sb.zy;
    F[kZyT * n + g] = stt.zy;
    // log-prob relative to the max: (z_y - m) - log s, never z_y - lse (lse ~1e4 would round it)
    F[kLogpB * n + g] = static_cast<float>((static_cast<double>(sb.zy) - sb.m) - lsb);
    F[kLogpT * n + g] = static_cast<float>((static_cast<double>(stt.zy) - stt.m) - lst);
    I[kTopB * n + g] = sb.top;
    I[kTopT * n + g] = stt.top;
    I[kShift * n + g] = shift_of(pair, g);
    I[kGtB * n + g] = sb.gt;
    I[kGtT * n + g] = stt.gt;
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
