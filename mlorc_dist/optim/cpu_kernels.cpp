// The Python bindings of the fused step's CPU kernels (cpu_kernels.py builds them as one
// extension): skinny.cpp's products, range_finder.cpp's range finder and blocks.cpp's block updates.
#include <torch/extension.h>

#include <tuple>
#include <vector>

at::Tensor rows(const at::Tensor& a, const at::Tensor& xt);
at::Tensor cols(const at::Tensor& x, const at::Tensor& a);
std::tuple<at::Tensor, at::Tensor, at::Tensor> range_finder(const at::Tensor& a, const at::Tensor& us,
                                                            const at::Tensor& vh, double keep, double mix,
                                                            const std::vector<int64_t>& seeds, int64_t q,
                                                            int64_t niter, int64_t rank);
void adamw_blocks(const std::vector<at::Tensor>& ws, const at::Tensor& g, const at::Tensor& m_us,
                  const at::Tensor& m_vh, const at::Tensor& v_us, const at::Tensor& v_vh, const at::Tensor& floors,
                  double beta1, double beta2, const std::vector<double>& step_sizes, double eps, double decay,
                  const at::Tensor& v_out, const std::vector<int64_t>& round_keys);
void lion_blocks(const std::vector<at::Tensor>& ws, const at::Tensor& g, const at::Tensor& m_us,
                 const at::Tensor& m_vh, double beta1, double lr, double decay, const std::vector<int64_t>& round_keys);

// The kernels touch no Python object: each releases the GIL while it runs.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("rows", &rows, release(), "a @ x for a ([B,] m, n) and xt = x^T ([B,] q, n), q <= 8");
  m.def("cols", &cols, release(), "x^T @ a for x ([B,] m, q) and a ([B,] m, n), q <= 8");
  m.def("range_finder", &range_finder, release(),
        "lowrank.range_finder_svd of keep us vh + mix a for each body of a batch: a (B, m, n), us (B, m, r0) "
        "and vh (B, r0, n) (both empty: A = a), keep, mix, seeds (B), q <= 8, niter, rank -> U, s, Vh");
  m.def("adamw_blocks", &adamw_blocks, release(),
        "fused.adamw_block_ on each body of a batch: ws (B weights (k, n)), g (B, k, n), factors "
        "(B, k, r) and (B, r, n) of both moments, floors (B,), betas, step sizes (B), eps, decay, v_out (B, k, n), "
        "round_keys (empty: to nearest; else seed_lo, seed_hi, start per body: bf16 stochastic rounding)");
  m.def("lion_blocks", &lion_blocks, release(),
        "fused.lion_block_ on each body of a batch: ws, g (B, k, n), factors (B, k, r) and (B, r, n), beta1, lr, decay, "
        "round_keys (as adamw_blocks)");
}
