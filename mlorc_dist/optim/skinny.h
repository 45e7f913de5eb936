// The skinny products' loops (skinny.cpp's rows and cols; range_finder.cpp calls them on each
// body of a batch):
//   rows_range:  rows [begin, end) of y = a x     a (m, n), x given as xt (Q, n), y (m, Q)
//   cols_range:  columns [begin, end) of z = x^T a     x (m, Q), a (m, n), z (Q, n)
// All row-major. Each row (column) of the result is summed in one order whatever the range, so
// a split over threads gives the same numbers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace mlorc {

// rows i .. i + R - 1 of y: each vector of xt is loaded once for R rows
template <typename T, int Q, int R>
inline void rows_block(const T* a, const T* xt, T* y, int64_t n, int64_t i) {
  using V = Vec<T>;
  typename V::type acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < Q; ++k) acc[r][k] = typename V::type{};
  int64_t j = 0;
  for (; j + V::size <= n; j += V::size) {
    typename V::type row[R];
    for (int r = 0; r < R; ++r) row[r] = V::load(a + (i + r) * n + j);
    for (int k = 0; k < Q; ++k) {
      const typename V::type x = V::load(xt + k * n + j);
      for (int r = 0; r < R; ++r) acc[r][k] += row[r] * x;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < Q; ++k) {
      T total = V::sum(acc[r][k]);
      for (int64_t jj = j; jj < n; ++jj) total += a[(i + r) * n + jj] * xt[k * n + jj];
      y[(i + r) * Q + k] = total;
    }
}

// Rows of a per pass (rows_range) and rows of a per update of z (cols_range). With AVX-512's 32
// vector registers, R x Q accumulators plus R rows and x fit at R = 5 for Q <= 4 (at Q = 5, 6 a
// few spill, with no penalty measured); more rows in flight are more independent memory streams
// and fewer reloads of x. Measured on the reference VM (AMD EPYC, one thread, q = 4, ms, before
// -> after; bench/cpu_primitives.py, docs/BENCHMARKS.md): a x at 2048^2 1.19 -> 0.48, 4096^2
// 6.10 -> 3.33; x^T a at 2048^2 0.88 -> 0.44, 4096^2 5.83 -> 3.38; 1024^2 unchanged. Without
// AVX-512 (16 registers, each of these vectors taking two) the earlier choice stays.
#if defined(__AVX512F__)
template <int Q> constexpr int kRowsPerPass = Q <= 2 ? 8 : (Q <= 6 ? 5 : 3);
constexpr int kRowsPerUpdate = 8;
#else
template <int Q> constexpr int kRowsPerPass = Q <= 2 ? 4 : (Q <= 4 ? 2 : 1);
constexpr int kRowsPerUpdate = 4;
#endif

template <typename T, int Q>
void rows_range(const T* a, const T* xt, T* y, int64_t n, int64_t begin, int64_t end) {
  constexpr int R = kRowsPerPass<Q>;
  int64_t i = begin;
  for (; i + R <= end; i += R) rows_block<T, Q, R>(a, xt, y, n, i);
  for (; i < end; ++i) rows_block<T, Q, 1>(a, xt, y, n, i);
}

// columns [begin, end) of z, in blocks of 16 KiB of z that stay in L1 while the rows stream
// through, kRowsPerUpdate rows per update of the block
template <typename T, int Q>
void cols_range(const T* x, const T* a, T* z, int64_t m, int64_t n, int64_t begin, int64_t end) {
  using V = Vec<T>;
  constexpr int RB = kRowsPerUpdate;
  constexpr int64_t kBlock = std::max<int64_t>(V::size, 16384 / int64_t(Q * sizeof(T)) / V::size * V::size);
  for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
    const int64_t j1 = std::min(end, j0 + kBlock);
    for (int k = 0; k < Q; ++k) std::fill(z + k * n + j0, z + k * n + j1, T(0));
    int64_t i = 0;
    for (; i + RB <= m; i += RB) {
      const T* a0 = a + i * n;
      T c[RB][Q];
      for (int r = 0; r < RB; ++r)
        for (int k = 0; k < Q; ++k) c[r][k] = x[(i + r) * Q + k];
      int64_t j = j0;
      for (; j + V::size <= j1; j += V::size) {
        typename V::type rows[RB];
        for (int r = 0; r < RB; ++r) rows[r] = V::load(a0 + r * n + j);
        for (int k = 0; k < Q; ++k) {
          typename V::type acc = V::load(z + k * n + j);
          for (int r = 0; r < RB; ++r) acc += rows[r] * c[r][k];
          V::store(z + k * n + j, acc);
        }
      }
      for (; j < j1; ++j)
        for (int k = 0; k < Q; ++k) {
          T total = z[k * n + j];
          for (int r = 0; r < RB; ++r) total += a0[r * n + j] * c[r][k];
          z[k * n + j] = total;
        }
    }
    for (; i < m; ++i)
      for (int k = 0; k < Q; ++k) {
        const T c = x[i * Q + k];
        for (int64_t j = j0; j < j1; ++j) z[k * n + j] += c * a[i * n + j];
      }
  }
}

template <typename T>
struct TypeTag { using type = T; };

// f(TypeTag<T>{}, std::integral_constant<int, Q>{}) for the tensor's dtype and Q = q in 1..8
template <typename F>
void for_dtype_and_width(const at::Tensor& t, int64_t q, F&& f) {
  auto with_width = [&](auto tag) {
    switch (q) {
      case 1: return f(tag, std::integral_constant<int, 1>{});
      case 2: return f(tag, std::integral_constant<int, 2>{});
      case 3: return f(tag, std::integral_constant<int, 3>{});
      case 4: return f(tag, std::integral_constant<int, 4>{});
      case 5: return f(tag, std::integral_constant<int, 5>{});
      case 6: return f(tag, std::integral_constant<int, 6>{});
      case 7: return f(tag, std::integral_constant<int, 7>{});
      case 8: return f(tag, std::integral_constant<int, 8>{});
      default: TORCH_CHECK(false, "mlorc skinny product / range finder: q must be 1..8, got ", q);
    }
  };
  if (t.scalar_type() == at::kFloat) with_width(TypeTag<float>{});
  else with_width(TypeTag<double>{});
}

}  // namespace mlorc
