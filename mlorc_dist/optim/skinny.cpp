// The range finder's skinny products on the CPU, for the fused MLorc step (skinny.py):
//   rows:  y = a x       a (m, n), x given as xt (q, n), y (m, q)
//   cols:  z = x^T a     x (m, q), a (m, n),             z (q, n)
// for q <= 8 in float32 and float64. Each is one pass over a. MKL's GEMM for q = 4 runs at
// ~13 GB/s here (one dependent chain of adds per output); these keep R x Q independent vector
// accumulators (rows) or 4 rows per update of an L1-resident block of z (cols).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd.h"

#include <algorithm>
#include <type_traits>

namespace {

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

// every matrix of a batch (B, m, n): a 2-D tensor is a batch of one
template <typename T, int Q>
void rows_all(const at::Tensor& a, const at::Tensor& xt, at::Tensor& y) {
  const int64_t batch = a.dim() == 3 ? a.size(0) : 1, m = a.size(-2), n = a.size(-1);
  for (int64_t b = 0; b < batch; ++b) {
    const T* pa = a.data_ptr<T>() + b * m * n;
    const T* px = xt.data_ptr<T>() + b * Q * n;
    T* py = y.data_ptr<T>() + b * m * Q;
    at::parallel_for(0, m, 64, [&](int64_t i, int64_t e) { rows_range<T, Q>(pa, px, py, n, i, e); });
  }
}

template <typename T, int Q>
void cols_all(const at::Tensor& x, const at::Tensor& a, at::Tensor& z) {
  const int64_t batch = a.dim() == 3 ? a.size(0) : 1, m = a.size(-2), n = a.size(-1);
  for (int64_t b = 0; b < batch; ++b) {
    const T* px = x.data_ptr<T>() + b * m * Q;
    const T* pa = a.data_ptr<T>() + b * m * n;
    T* pz = z.data_ptr<T>() + b * Q * n;
    at::parallel_for(0, n, 512, [&](int64_t j, int64_t e) { cols_range<T, Q>(px, pa, pz, m, n, j, e); });
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
      default: TORCH_CHECK(false, "mlorc skinny product: q must be 1..8, got ", q);
    }
  };
  if (t.scalar_type() == at::kFloat) with_width(TypeTag<float>{});
  else with_width(TypeTag<double>{});
}

void check(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK((t.dim() == 2 || t.dim() == 3) && t.dim() == dim && t.is_contiguous() && t.device().is_cpu() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "mlorc skinny product: ", name, " must be a contiguous 2-D (or batched 3-D, like the other "
              "operand) float32/float64 CPU tensor");
}

}  // namespace

at::Tensor rows(const at::Tensor& a, const at::Tensor& xt) {
  check(a, a.dim(), "a");
  check(xt, a.dim(), "xt");
  TORCH_CHECK(a.size(-1) == xt.size(-1) && (a.dim() == 2 || a.size(0) == xt.size(0)) &&
                  a.scalar_type() == xt.scalar_type(),
              "rows: a ([B,] m, n) and xt ([B,] q, n) of one dtype");
  auto y = a.dim() == 2 ? at::empty({a.size(0), xt.size(0)}, a.options())
                        : at::empty({a.size(0), a.size(1), xt.size(1)}, a.options());
  for_dtype_and_width(a, xt.size(-2), [&](auto tag, auto q) {
    rows_all<typename decltype(tag)::type, decltype(q)::value>(a, xt, y);
  });
  return y;
}

at::Tensor cols(const at::Tensor& x, const at::Tensor& a) {
  check(a, a.dim(), "a");
  check(x, a.dim(), "x");
  TORCH_CHECK(a.size(-2) == x.size(-2) && (a.dim() == 2 || a.size(0) == x.size(0)) &&
                  a.scalar_type() == x.scalar_type(),
              "cols: x ([B,] m, q) and a ([B,] m, n) of one dtype");
  auto z = a.dim() == 2 ? at::empty({x.size(1), a.size(1)}, a.options())
                        : at::empty({a.size(0), x.size(2), a.size(2)}, a.options());
  for_dtype_and_width(a, x.size(-1), [&](auto tag, auto q) {
    cols_all<typename decltype(tag)::type, decltype(q)::value>(x, a, z);
  });
  return z;
}
