// The range finder's skinny products on the CPU, for the fused MLorc step (skinny.py):
//   rows:  y = a x       a (m, n), x given as xt (q, n), y (m, q)
//   cols:  z = x^T a     x (m, q), a (m, n),             z (q, n)
// for q <= 8 in float32 and float64. Each is one pass over a. MKL's GEMM for q = 4 runs at
// ~13 GB/s here (one dependent chain of adds per output); these keep R x Q independent vector
// accumulators (rows) or 4 rows per update of an L1-resident block of z (cols).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "skinny.h"

#include <algorithm>
#include <type_traits>

namespace {

using mlorc::cols_range;
using mlorc::for_dtype_and_width;
using mlorc::rows_range;

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
