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

template <typename T, int Q>
void rows_range(const T* a, const T* xt, T* y, int64_t n, int64_t begin, int64_t end) {
  constexpr int R = Q <= 2 ? 4 : (Q <= 4 ? 2 : 1);  // R * Q accumulators fit the registers
  int64_t i = begin;
  for (; i + R <= end; i += R) rows_block<T, Q, R>(a, xt, y, n, i);
  for (; i < end; ++i) rows_block<T, Q, 1>(a, xt, y, n, i);
}

// columns [begin, end) of z, in blocks that stay in L1 while the rows stream through, 4 at a time
template <typename T, int Q>
void cols_range(const T* x, const T* a, T* z, int64_t m, int64_t n, int64_t begin, int64_t end) {
  using V = Vec<T>;
  constexpr int64_t kBlock = 512;
  for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
    const int64_t j1 = std::min(end, j0 + kBlock);
    for (int k = 0; k < Q; ++k) std::fill(z + k * n + j0, z + k * n + j1, T(0));
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      const T* a0 = a + i * n;
      T c[4][Q];
      for (int r = 0; r < 4; ++r)
        for (int k = 0; k < Q; ++k) c[r][k] = x[(i + r) * Q + k];
      int64_t j = j0;
      for (; j + V::size <= j1; j += V::size) {
        const typename V::type r0 = V::load(a0 + j), r1 = V::load(a0 + n + j),
                               r2 = V::load(a0 + 2 * n + j), r3 = V::load(a0 + 3 * n + j);
        for (int k = 0; k < Q; ++k) {
          typename V::type acc = V::load(z + k * n + j);
          acc += r0 * c[0][k] + r1 * c[1][k] + r2 * c[2][k] + r3 * c[3][k];
          V::store(z + k * n + j, acc);
        }
      }
      for (; j < j1; ++j)
        for (int k = 0; k < Q; ++k)
          z[k * n + j] += a0[j] * c[0][k] + a0[n + j] * c[1][k] + a0[2 * n + j] * c[2][k] +
                          a0[3 * n + j] * c[3][k];
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
