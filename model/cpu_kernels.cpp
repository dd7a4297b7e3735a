// CPU fp32 kernels for decode steps (AVX2 + FMA), registered as `torch.ops.maverick.*`.
//
// A decode step multiplies a few rows by every weight once and attends one query per sequence:
// the library kernels spend much of that time on dispatch, threading and copies (K/V gathers).
//   skinny_linear     y[M, O] = x[M, I] @ w[O, I]^T. Walks a few weight rows at a time along I
//                     (their natural [out, in] layout), keeps them in L1 while every input row
//                     passes over them, and splits O across the intra-op threads: it streams the
//                     weights near the memory bandwidth where MKL and oneDNN reach about half.
//   rms_norm          x * rsqrt(mean(x^2) + eps) [* weight], one pass per row.
//   silu_mul          SwiGLU's silu(gate) * up in one pass.
//   grouped_experts   every routed expert of a layer in one call (the Python loop cost ~1 ms/layer).
//   decode_attention  one query per sequence straight from the paged, head-major K/V cache.
// Work is split with `split_for`, not at::parallel_for: a thread held up elsewhere has its chunks taken.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <exception>
#include <vector>

namespace {

// f(begin, end) over [0, n) in chunks of `grain`. at::parallel_for gives each thread a fixed share:
// when the rest of a serving stack preempts one thread mid-kernel, the other finishes its own share
// and waits for the absent one to come back and finish its. Here each thread still streams through
// its own share first (one contiguous run of weights, as the prefetcher likes), then takes the
// chunks of a share whose owner has not reached them, so the absent thread's work gets done. The
// region's closing barrier still waits for every thread to arrive: an absence longer than the
// kernel is waited out all the same.
template <class F>
void split_for(int64_t n, int64_t grain, const F& f) {
  at::internal::lazy_init_num_threads();
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t team = std::min<int64_t>(at::get_num_threads(), chunks);
  if (team <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  struct alignas(64) Share {  // a cache line each: the owner's claims do not contend with the others'
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::vector<Share> shares(team);
  for (int64_t t = 0; t < team; ++t) {
    shares[t].next.store(chunks * t / team, std::memory_order_relaxed);
    shares[t].end = chunks * (t + 1) / team;
  }
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;  // a throw must not cross the region's end: kept and rethrown after it
#pragma omp parallel  // no num_threads clause: torch avoids it for GOMP's pool (pytorch#32008)
  {
    const int64_t me = omp_get_thread_num();
    at::internal::ThreadIdGuard tid(me);  // at::get_thread_num() inside f, as under at::parallel_for
    try {
      for (int64_t k = 0; k < team; ++k) {  // own share first (a thread past `team` only helps)
        Share& share = shares[(me + k) % team];
        for (int64_t c = share.next.fetch_add(1); c < share.end; c = share.next.fetch_add(1))
          f(c * grain, std::min(n, (c + 1) * grain));
      }
    } catch (...) {
      if (!failed.test_and_set()) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MB input rows x RB weight rows over the whole reduction; accumulators stay in registers.
template <int MB, int RB>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t I, float* y, int64_t ldy) {
  __m256 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < I; i += 8) {
    __m256 wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = _mm256_loadu_ps(w + r * I + i);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + i);
      for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) y[m * ldy + r] = hsum(acc[m][r]);
}

// All M rows against weight rows [o, o + RB): 4-row input blocks, then the remainder.
template <int RB>
inline void column_block(const float* x, int64_t ldx, int64_t M, const float* w, int64_t I,
                         float* y, int64_t O, int64_t o) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, RB>(x + m * ldx, ldx, w + o * I, I, y + m * O + o, O);
  switch (M - m) {
    case 3: tile<3, RB>(x + m * ldx, ldx, w + o * I, I, y + m * O + o, O); break;
    case 2: tile<2, RB>(x + m * ldx, ldx, w + o * I, I, y + m * O + o, O); break;
    case 1: tile<1, RB>(x + m * ldx, ldx, w + o * I, I, y + m * O + o, O); break;
    default: break;
  }
}

template <int RB>
void run(const float* x, int64_t ldx, int64_t M, const float* w, int64_t I, int64_t O, float* y) {
  const int64_t blocks = O / RB;
  // ~64 KB of weights per task: small matrices are not worth waking the other thread for
  const int64_t grain = std::max<int64_t>(1, 16384 / (RB * I));
  split_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) column_block<RB>(x, ldx, M, w, I, y, O, b * RB);
  });
  for (int64_t o = blocks * RB; o < O; ++o) column_block<1>(x, ldx, M, w, I, y, O, o);
}

void gemm(const float* x, int64_t ldx, int64_t M, const float* w, int64_t I, int64_t O, float* y) {
  if (M == 0) return;
  // 3 weight rows x 4 input rows fill the 16 vector registers; fewer input rows afford more
  // weight rows at once, and a lone row streams best with 8 (measured: ~15% over 4)
  if (M == 1)
    run<8>(x, ldx, M, w, I, O, y);
  else if (M == 2)
    run<4>(x, ldx, M, w, I, O, y);
  else
    run<3>(x, ldx, M, w, I, O, y);
}

constexpr int64_t kMaxSkinnyRows = 64;  // above this (prefill) the library GEMM is as fast

void check_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: shapes ", x.sizes(), " ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "linear: fp32 only");
  TORCH_CHECK(w.is_contiguous() && x.stride(1) == 1 && x.size(1) % 8 == 0, "linear: layout");
}

torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& w) {
  check_linear(x, w);
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  gemm(x.data_ptr<float>(), x.stride(0), x.size(0), w.data_ptr<float>(), x.size(1), w.size(0), y.data_ptr<float>());
  return y;
}

// Skinny inputs through the kernel, prefill-sized ones through the library GEMM.
torch::Tensor any_linear(const torch::Tensor& x, const torch::Tensor& w) {
  return x.size(0) <= kMaxSkinnyRows ? skinny_linear(x, w) : at::linear(x, w);
}

torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) % 8 == 0, "rms_norm: layout");
  const int64_t D = x.size(-1), N = x.numel() / D;
  const float* w = nullptr;
  if (weight.has_value()) {
    TORCH_CHECK(weight->is_contiguous() && weight->numel() == D && weight->scalar_type() == at::kFloat, "rms_norm: weight");
    w = weight->data_ptr<float>();
  }
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  split_for(N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = xp + n * D;
      float* out = yp + n * D;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < D; i += 8) {
        const __m256 v = _mm256_loadu_ps(row + i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(hsum(acc) / D + static_cast<float>(eps)));
      for (int64_t i = 0; i < D; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + i), inv);
        if (w) v = _mm256_mul_ps(v, _mm256_loadu_ps(w + i));
        _mm256_storeu_ps(out + i, v);
      }
    }
  });
  return y;
}

// exp(x) for x <= 0 (scores minus their max): 2^n * P(r) with r = x - n ln2 in [-ln2/2, ln2/2],
// P the degree-7 polynomial of Cephes' expf; relative error ~1e-7, as expf.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below this expf is denormal; treat as ~0
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for accuracy
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// One (sequence, kv head): its R query heads against the sequence's L keys, softmax in fp32.
void attend_one(const float* q, int64_t R, int64_t K, const float* k_cache, const float* v_cache,
                const int64_t* slots, int64_t L, float scale, float* scores, float* out) {
  const int64_t Lpad = (L + 7) / 8 * 8;
  for (int64_t l = 0; l < L; ++l) {
    const float* k = k_cache + slots[l] * K;
    for (int64_t r = 0; r < R; ++r) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < K; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * K + i), _mm256_loadu_ps(k + i), acc);
      scores[r * Lpad + l] = hsum(acc) * scale;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* s = scores + r * Lpad;
    float top = s[0];
    for (int64_t l = 1; l < L; ++l) top = std::max(top, s[l]);
    for (int64_t l = L; l < Lpad; ++l) s[l] = -INFINITY;  // padding lanes add exp(-87) ~ 0
    __m256 total = _mm256_setzero_ps();
    const __m256 top_v = _mm256_set1_ps(top);
    for (int64_t l = 0; l < Lpad; l += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + l), top_v));
      _mm256_storeu_ps(s + l, e);
      total = _mm256_add_ps(total, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(total));
    for (int64_t i0 = 0; i0 < K; i0 += 64) {  // 8 accumulators cover 64 dims
      const int64_t n = std::min<int64_t>(8, (K - i0) / 8);
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t l = 0; l < L; ++l) {
        const __m256 p = _mm256_set1_ps(s[l]);
        const float* v = v_cache + slots[l] * K + i0;
        for (int j = 0; j < n; ++j) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * j), acc[j]);
      }
      for (int j = 0; j < n; ++j) _mm256_storeu_ps(out + r * K + i0 + 8 * j, _mm256_mul_ps(acc[j], inv));
    }
  }
}

// q [B, H, K] (rows may be strided), caches [G, S, K], slots [B, Lmax] (padded), lengths [B].
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& slots, const torch::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat
              && v_cache.scalar_type() == at::kFloat, "decode_attention: fp32 q [B, H, K], caches [G, S, K]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && q.stride(2) == 1 && q.stride(1) == q.size(2)
              && q.size(2) % 8 == 0 && k_cache.sizes() == v_cache.sizes(), "decode_attention: layout");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && slots.is_contiguous()
              && lengths.is_contiguous() && slots.size(0) == q.size(0), "decode_attention: slots");
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), G = k_cache.size(0), S = k_cache.size(1);
  TORCH_CHECK(G > 0 && H % G == 0, "decode_attention: query heads must be a multiple of kv heads");
  const int64_t R = H / G, Lmax = slots.size(1);
  auto o = torch::empty({B, H, K}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  const int64_t *sp = slots.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  float* op = o.data_ptr<float>();
  const int64_t ldq = q.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= Lmax, "decode_attention: length");
    for (int64_t l = 0; l < lp[b]; ++l)  // the kernel reads the cache at these rows unchecked
      TORCH_CHECK(sp[b * Lmax + l] >= 0 && sp[b * Lmax + l] < S, "decode_attention: slot out of range");
  }
  split_for(B * G, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scores;  // one per thread, not per chunk
    scores.resize(R * ((Lmax + 7) / 8 * 8));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / G, g = t % G;
      attend_one(qp + b * ldq + g * R * K, R, K, kp + g * S * K, vp + g * S * K, sp + b * Lmax, lp[b],
                 static_cast<float>(scale), scores.data(), op + (b * H + g * R) * K);
    }
  });
  return o;
}

// silu(x) = x * sigmoid(x), sigmoid from exp(-|x|) so the exponent never overflows.
inline __m256 silu(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 neg_abs = _mm256_or_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 e = exp_nonpositive(neg_abs);
  const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));  // sigmoid(|x|)
  const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), x);  // sign bit set: sigmoid(-|x|)
  return _mm256_mul_ps(x, sig);
}

// SwiGLU's middle: h [N, 2F] = [gate | up] -> silu(gate) * up [N, F].
torch::Tensor silu_mul(const torch::Tensor& h) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.stride(1) == 1 && h.size(1) % 16 == 0,
              "silu_mul: fp32 [N, 2F] with F a multiple of 8");
  const int64_t N = h.size(0), F = h.size(1) / 2, ld = h.stride(0);
  auto out = torch::empty({N, F}, h.options());
  const float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  split_for(N, std::max<int64_t>(1, 16384 / F), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t i = 0; i < F; i += 8) {
        const __m256 g = _mm256_loadu_ps(hp + n * ld + i), u = _mm256_loadu_ps(hp + n * ld + F + i);
        _mm256_storeu_ps(op + n * F + i, _mm256_mul_ps(silu(g), u));
      }
  });
  return out;
}

// Routed experts over rows already sorted by local expert: rows [start_e, start_e + counts[e]) go
// through expert e. gate_up [e, 2F, D] and down [e, D, F] are [out, in] per expert. One call per
// MoE layer instead of a dozen small ops per expert.
torch::Tensor grouped_experts(const torch::Tensor& x, const torch::Tensor& counts, const torch::Tensor& gate_up,
                              const torch::Tensor& down) {
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && x.is_contiguous() && gate_up.is_contiguous()
              && down.is_contiguous(), "grouped_experts: contiguous x [N, D], gate_up [e, 2F, D], down [e, D, F]");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.numel() == gate_up.size(0) && down.size(0) == gate_up.size(0)
              && gate_up.size(2) == x.size(1) && down.size(1) == x.size(1) && down.size(2) * 2 == gate_up.size(1),
              "grouped_experts: shapes");
  auto y = torch::empty_like(x);
  const int64_t* cp = counts.data_ptr<int64_t>();
  int64_t start = 0, total = 0;
  for (int64_t e = 0; e < counts.numel(); ++e) total += cp[e];
  TORCH_CHECK(total == x.size(0), "grouped_experts: counts must add up to the rows");
  for (int64_t e = 0; e < counts.numel(); ++e) {
    const int64_t n = cp[e];
    if (n == 0) continue;
    const auto rows = x.narrow(0, start, n);
    const auto act = silu_mul(any_linear(rows, gate_up[e]));
    y.narrow(0, start, n).copy_(any_linear(act, down[e]));
    start += n;
  }
  return y;
}

}  // namespace

// A dispatcher op (not a pybind function), so profiles name it and the dispatcher checks devices.
TORCH_LIBRARY(maverick, m) {
  m.def("skinny_linear(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor h) -> Tensor");
  m.def("grouped_experts(Tensor x, Tensor counts, Tensor gate_up, Tensor down) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(maverick, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("grouped_experts", &grouped_experts);
  m.impl("decode_attention", &decode_attention);
}
