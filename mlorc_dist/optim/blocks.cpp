// The fused step's block updates on the CPU (fused.py: adamw_blocks_, lion_blocks_): the same
// math as fused.adamw_block_ / lion_block_, for every body of a batch in one call.
//
// Per body (k, n) with factors us (k, r), vh (r, n) per moment, row by row: one vectorised loop
// computes the rebuilt entries sum_l us[i, l] vh[l, j] (r multiply-adds each, in registers for
// r <= 8, compiled once per rank; above, through column chunks that stay in L1), reads G and W
// once and writes W (and AdamW's V) once. AdamW first makes a read-free pass over the second
// moment's factors for the negative fix's statistics (lowrank.negative_stats).
//
// Why not torch.compile, as on a GPU: each compiled call costs ~0.15 ms of dynamo guards and
// wrappers on the reference VM, most of a 256 x 256 body's step, where a batch here is one call;
// and this loop is faster (one thread, AdamW, r = 4: 4 x 256^2 0.17 vs 0.63 ms, 1024^2 0.63 vs
// 1.14 ms, 4096^2 18.4 vs 23.1 ms; bench/block_kernels.py, docs/BENCHMARKS.md).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t kChunk = 256;  // columns per chunk (ranks above 8): chunk buffers stay in L1
constexpr int64_t kGrain = 16;   // rows per parallel task

// sum_l c[l] vh[l, j] for a rank R known at compile time (unrolled; vectorised over j by the caller)
template <int R, typename T>
inline T rank_sum_at(const T* c, const T* __restrict vh, int64_t n, int64_t j) {
  T total = c[0] * vh[j];
  for (int l = 1; l < R; ++l) total += c[l] * vh[l * n + j];
  return total;
}

// any rank: out[j] = sum_l us_row[l] vh[l, j0 + j] for j < len, a chunk at a time
template <typename T>
inline void rebuild_chunk(const T* us_row, const T* vh, int64_t r, int64_t n, int64_t j0, int64_t len,
                          T* __restrict out) {
  const T first = us_row[0];
  const T* v0 = vh + j0;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) out[j] = first * v0[j];
  for (int64_t l = 1; l < r; ++l) {
    const T c = us_row[l];
    const T* v = vh + l * n + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) out[j] += c * v[j];
  }
}

// f(std::integral_constant<int, R>{}) with R = r for r <= 8 (compiled one by one: the rebuild sum
// stays in registers; measured 10-30% faster than chunks at r = 4 and 8), else R = 0 (any rank)
template <typename F>
void for_rank(int64_t r, F&& f) {
  switch (r) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// lane-wise (or, with VT = T, for one entry): below += min(v + floor, 0), count += (v < -floor)
template <typename VT, typename T>
inline void add_negatives(const VT& v, T floor, VT& below, VT& count) {
  const VT zero = VT{}, shifted = v + floor;
  below += shifted < zero ? shifted : zero;
  count += v < -floor ? zero + T(1) : zero;
}

// lowrank.negative_stats of the rebuilt us @ vh (k, n) without writing it: the sum of |v| over
// the entries below -floor, and their count. Explicit vectors: written as a `#pragma omp simd`
// reduction the compiler left this loop scalar, and it took half of the AdamW kernel's time.
// Partial sums per row, added in double.
template <int R, typename T>
std::pair<double, double> negative_stats(const T* us, const T* vh, int64_t k, int64_t r, int64_t n, T floor) {
  using V = Vec<T>;
  using VT = typename V::type;
  std::vector<double> sums(k), counts(k);
  at::parallel_for(0, k, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) T chunk[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      VT below = VT{}, count = VT{};
      T tail_below = 0, tail_count = 0;
      if constexpr (R > 0) {
        T c[R];
        for (int l = 0; l < R; ++l) c[l] = us[i * R + l];
        int64_t j = 0;
        for (; j + V::size <= n; j += V::size) {
          VT v = c[0] * V::load(vh + j);
          for (int l = 1; l < R; ++l) v += c[l] * V::load(vh + l * n + j);
          add_negatives(v, floor, below, count);
        }
        for (; j < n; ++j) add_negatives(rank_sum_at<R>(c, vh, n, j), floor, tail_below, tail_count);
      } else {
        for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
          const int64_t len = std::min(kChunk, n - j0);
          rebuild_chunk(us + i * r, vh, r, n, j0, len, chunk);
          int64_t j = 0;
          for (; j + V::size <= len; j += V::size) add_negatives(V::load(chunk + j), floor, below, count);
          for (; j < len; ++j) add_negatives(chunk[j], floor, tail_below, tail_count);
        }
      }
      sums[i] = double(V::sum(below)) + tail_below;
      counts[i] = double(V::sum(count)) + tail_count;
    }
  });
  double below = 0, count = 0;
  for (int64_t i = 0; i < k; ++i) {
    below += sums[i];
    count += counts[i];
  }
  return {double(floor) * count - below, count};
}

// Stochastic rounding of the weights (optim/rounding.py, the same function): 16 random bits per
// element from a hash of (seed, the element's index in the whole parameter), added to the float32
// pattern before the low 16 bits are cut. key.start: the body's first element in the parameter.
struct RoundKey {
  uint32_t lo = 0, hi = 0;
  int64_t start = 0;
};

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

inline uint32_t round_bits(const RoundKey& key, int64_t index) {
  return mix32(mix32(uint32_t(uint64_t(key.start + index)) ^ key.lo) ^ key.hi) >> 16;
}

inline c10::BFloat16 round_stochastic(float x, uint32_t bits) {
  uint32_t pattern;
  std::memcpy(&pattern, &x, sizeof pattern);
  if ((pattern & 0x7F800000u) == 0x7F800000u) return c10::BFloat16(x);   // inf, NaN: to nearest
  return c10::BFloat16(uint16_t((pattern + bits) >> 16), c10::BFloat16::from_bits());
}

// the weight's new value x written as W: stochastically rounded (SR, bf16 weights) or to nearest
template <bool SR, typename W, typename T>
inline W store(T x, const RoundKey& key, int64_t index) {
  if constexpr (SR && std::is_same_v<W, c10::BFloat16> && std::is_same_v<T, float>) {
    return round_stochastic(x, round_bits(key, index));
  } else {
    return W(x);
  }
}

// f(std::bool_constant<SR>{}) for the batch's rounding: stochastic when the caller gave seeds
template <typename F>
void for_rounding(bool stochastic, F&& f) {
  if (stochastic) return f(std::true_type{});
  return f(std::false_type{});
}

template <typename T>
struct AdamWConstants {
  T floor, fill, one_minus_beta1, beta2, one_minus_beta2, step_size, eps, decay;
};

// one entry: the negative fix of the rebuilt v, the new moments, the weight update
template <bool SR, typename W, typename T>
inline void adamw_entry(W& w, T g, T m_prev, T v_prev, T& v_out, const AdamWConstants<T>& c, const RoundKey& key,
                        int64_t index) {
  v_prev = v_prev < -c.floor ? c.fill : (v_prev < c.floor ? c.floor : v_prev);  // lowrank.fill_negatives_
  const T m = m_prev + c.one_minus_beta1 * (g - m_prev);
  const T v = c.beta2 * v_prev + c.one_minus_beta2 * (g * g);
  w = store<SR, W>((T(w) - c.step_size * m / (std::sqrt(v) + c.eps)) * c.decay, key, index);
  v_out = v;
}

template <int R, bool SR, typename W, typename T>
void adamw_body(W* __restrict w, const T* __restrict g, const T* m_us, const T* __restrict m_vh, const T* v_us,
                const T* __restrict v_vh, T* __restrict v_out, int64_t k, int64_t n, int64_t r, T floor, T beta1,
                T beta2, T step_size, T eps, T decay, RoundKey key) {
  const auto [abs_sum, count] = negative_stats<R>(v_us, v_vh, k, r, n, floor);
  const AdamWConstants<T> c{floor, T(abs_sum) / std::max(T(count), T(1)),   // lowrank.negative_fill_value
                            T(1) - beta1, beta2, T(1) - beta2, step_size, eps, decay};
  at::parallel_for(0, k, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) T m_chunk[kChunk];
    alignas(64) T v_chunk[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      W* wi = w + i * n;
      const T* gi = g + i * n;
      T* vi = v_out + i * n;
      if constexpr (R > 0) {
        T cm[R], cv[R];
        for (int l = 0; l < R; ++l) {
          cm[l] = m_us[i * R + l];
          cv[l] = v_us[i * R + l];
        }
#pragma omp simd
        for (int64_t j = 0; j < n; ++j)
          adamw_entry<SR>(wi[j], gi[j], rank_sum_at<R>(cm, m_vh, n, j), rank_sum_at<R>(cv, v_vh, n, j), vi[j], c,
                          key, i * n + j);
      } else {
        for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
          const int64_t len = std::min(kChunk, n - j0);
          rebuild_chunk(m_us + i * r, m_vh, r, n, j0, len, m_chunk);
          rebuild_chunk(v_us + i * r, v_vh, r, n, j0, len, v_chunk);
#pragma omp simd
          for (int64_t j = 0; j < len; ++j)
            adamw_entry<SR>(wi[j0 + j], gi[j0 + j], m_chunk[j], v_chunk[j], vi[j0 + j], c, key, i * n + j0 + j);
        }
      }
    }
  });
}

// one entry: sign of the interpolated moment, the weight update
template <bool SR, typename W, typename T>
inline void lion_entry(W& w, T g, T m_prev, T one_minus_beta1, T lr, T decay, const RoundKey& key, int64_t index) {
  const T x = m_prev + one_minus_beta1 * (g - m_prev);
  const T direction = T(x > T(0)) - T(x < T(0));            // torch.sign
  w = store<SR, W>((T(w) - lr * direction) * decay, key, index);
}

template <int R, bool SR, typename W, typename T>
void lion_body(W* __restrict w, const T* __restrict g, const T* m_us, const T* __restrict m_vh, int64_t k,
               int64_t n, int64_t r, T beta1, T lr, T decay, RoundKey key) {
  const T one_minus_beta1 = T(1) - beta1;
  at::parallel_for(0, k, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) T m_chunk[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      W* wi = w + i * n;
      const T* gi = g + i * n;
      if constexpr (R > 0) {
        T cm[R];
        for (int l = 0; l < R; ++l) cm[l] = m_us[i * R + l];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j)
          lion_entry<SR>(wi[j], gi[j], rank_sum_at<R>(cm, m_vh, n, j), one_minus_beta1, lr, decay, key, i * n + j);
      } else {
        for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
          const int64_t len = std::min(kChunk, n - j0);
          rebuild_chunk(m_us + i * r, m_vh, r, n, j0, len, m_chunk);
#pragma omp simd
          for (int64_t j = 0; j < len; ++j)
            lion_entry<SR>(wi[j0 + j], gi[j0 + j], m_chunk[j], one_minus_beta1, lr, decay, key, i * n + j0 + j);
        }
      }
    }
  });
}

// f(T{}, W{}) for the compute dtype T (float32 or float64) and the weights' dtype W
template <typename F>
void for_dtypes(at::ScalarType compute, at::ScalarType weight, F&& f) {
  if (compute == at::kDouble) {
    TORCH_CHECK(weight == at::kDouble, "mlorc block update: float64 factors need float64 weights");
    return f(double{}, double{});
  }
  switch (weight) {
    case at::kFloat: return f(float{}, float{});
    case at::kBFloat16: return f(float{}, c10::BFloat16{});
    case at::kHalf: return f(float{}, c10::Half{});
    default: TORCH_CHECK(false, "mlorc block update: weights must be float32, bfloat16 or float16 with float32 factors");
  }
}

// the batch's shapes: g (B, k, n) and every factor of the compute dtype; ws B weights (k, n)
void check_batch(const std::vector<at::Tensor>& ws, const at::Tensor& g,
                 const std::vector<std::pair<at::Tensor, at::Tensor>>& factors) {
  TORCH_CHECK(g.dim() == 3 && g.is_contiguous() && g.device().is_cpu() &&
                  (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble),
              "mlorc block update: g must be a contiguous (B, k, n) float32/float64 CPU tensor");
  const int64_t batch = g.size(0), k = g.size(1), n = g.size(2);
  TORCH_CHECK(batch >= 1 && int64_t(ws.size()) == batch, "mlorc block update: ", ws.size(),
              " weights for a batch of ", batch);
  for (const auto& w : ws)
    TORCH_CHECK(w.dim() == 2 && w.size(0) == k && w.size(1) == n && w.is_contiguous() && w.device().is_cpu() &&
                    w.scalar_type() == ws[0].scalar_type(),
                "mlorc block update: every weight must be a contiguous (k, n) CPU tensor of one dtype, like g's bodies");
  for (const auto& [us, vh] : factors)
    TORCH_CHECK(us.dim() == 3 && vh.dim() == 3 && us.size(0) == batch && vh.size(0) == batch && us.size(1) == k &&
                    vh.size(2) == n && us.size(2) == vh.size(1) && us.size(2) >= 1 && us.is_contiguous() &&
                    vh.is_contiguous() && us.device().is_cpu() && vh.device().is_cpu() &&
                    us.scalar_type() == g.scalar_type() && vh.scalar_type() == g.scalar_type(),
                "mlorc block update: factors must be contiguous (B, k, r) and (B, r, n) CPU tensors of g's dtype");
}

// round_keys: empty (weights rounded to nearest) or (seed_lo, seed_hi, start) per body, for bf16 weights
std::vector<RoundKey> round_keys_of(const std::vector<int64_t>& flat, const std::vector<at::Tensor>& ws) {
  std::vector<RoundKey> keys;
  if (flat.empty()) return keys;
  TORCH_CHECK(flat.size() == 3 * ws.size(), "mlorc block update: round_keys must hold 3 numbers per body");
  TORCH_CHECK(ws[0].scalar_type() == at::kBFloat16, "mlorc block update: stochastic rounding writes bfloat16 weights");
  for (size_t b = 0; b < ws.size(); ++b)
    keys.push_back(RoundKey{uint32_t(flat[3 * b]), uint32_t(flat[3 * b + 1]), flat[3 * b + 2]});
  return keys;
}

}  // namespace

void adamw_blocks(const std::vector<at::Tensor>& ws, const at::Tensor& g, const at::Tensor& m_us,
                  const at::Tensor& m_vh, const at::Tensor& v_us, const at::Tensor& v_vh, const at::Tensor& floors,
                  double beta1, double beta2, const std::vector<double>& step_sizes, double eps, double decay,
                  const at::Tensor& v_out, const std::vector<int64_t>& round_keys) {
  check_batch(ws, g, {{m_us, m_vh}, {v_us, v_vh}});
  const std::vector<RoundKey> keys = round_keys_of(round_keys, ws);
  const int64_t batch = g.size(0), k = g.size(1), n = g.size(2), r = m_us.size(2);
  TORCH_CHECK(v_us.size(2) == r, "adamw_blocks: both moments' factors must have one rank");
  TORCH_CHECK(v_out.sizes() == g.sizes() && v_out.is_contiguous() && v_out.device().is_cpu() &&
                  v_out.scalar_type() == g.scalar_type(),
              "adamw_blocks: v_out must be a contiguous tensor like g");
  TORCH_CHECK(floors.dim() == 1 && floors.size(0) == batch && floors.device().is_cpu(),
              "adamw_blocks: floors must be a (B,) CPU tensor");
  TORCH_CHECK(int64_t(step_sizes.size()) == batch, "adamw_blocks: one step size per body");
  const at::Tensor floor_values = floors.to(at::kDouble).contiguous();
  for_dtypes(g.scalar_type(), ws[0].scalar_type(), [&](auto compute, auto weight) {
    using T = decltype(compute);
    using W = decltype(weight);
    for_rank(r, [&](auto rank) {
      for_rounding(!keys.empty(), [&](auto sr) {
        for (int64_t b = 0; b < batch; ++b)
          adamw_body<decltype(rank)::value, decltype(sr)::value, W, T>(
              ws[b].data_ptr<W>(), g.data_ptr<T>() + b * k * n, m_us.data_ptr<T>() + b * k * r,
              m_vh.data_ptr<T>() + b * r * n, v_us.data_ptr<T>() + b * k * r, v_vh.data_ptr<T>() + b * r * n,
              v_out.data_ptr<T>() + b * k * n, k, n, r, T(floor_values.data_ptr<double>()[b]), T(beta1), T(beta2),
              T(step_sizes[b]), T(eps), T(decay), keys.empty() ? RoundKey{} : keys[b]);
      });
    });
  });
}

void lion_blocks(const std::vector<at::Tensor>& ws, const at::Tensor& g, const at::Tensor& m_us,
                 const at::Tensor& m_vh, double beta1, double lr, double decay,
                 const std::vector<int64_t>& round_keys) {
  check_batch(ws, g, {{m_us, m_vh}});
  const std::vector<RoundKey> keys = round_keys_of(round_keys, ws);
  const int64_t batch = g.size(0), k = g.size(1), n = g.size(2), r = m_us.size(2);
  for_dtypes(g.scalar_type(), ws[0].scalar_type(), [&](auto compute, auto weight) {
    using T = decltype(compute);
    using W = decltype(weight);
    for_rank(r, [&](auto rank) {
      for_rounding(!keys.empty(), [&](auto sr) {
        for (int64_t b = 0; b < batch; ++b)
          lion_body<decltype(rank)::value, decltype(sr)::value, W, T>(
              ws[b].data_ptr<W>(), g.data_ptr<T>() + b * k * n, m_us.data_ptr<T>() + b * k * r,
              m_vh.data_ptr<T>() + b * r * n, k, n, r, T(beta1), T(lr), T(decay),
              keys.empty() ? RoundKey{} : keys[b]);
      });
    });
  });
}
