// The fused step's range finder on the CPU (skinny.compress_batch): lowrank.range_finder_svd of
// a new moment A = keep us vh + mix a, for every body of a batch in one call, from the test
// matrices' seeds to the truncated factors (U (m, r), s (r), Vh (r, n)).
//
// Per body, the same steps as lowrank.range_finder_svd:
//   Omega (n, q) drawn from the body's seed as lowrank.gaussian_test_matrix draws it (torch's
//   CPU generator, float64, then the compute dtype): the same numbers;
//   Y = A Omega, Q = orth(Y); niter times Z = orth((Q^T A)^T), Q = orth(A Z); B = Q^T A;
//   B = U diag(s) Vh, truncated to r = min(rank, q).
// The products with a are skinny.h's loops (one pass over a each); the unformed term
// keep us (vh x) costs O((m + n) r q). The small algebra runs in float64: orth is a Householder
// QR (a zero or rank-deficient Y still gives orthonormal columns), and the SVD of B (q, n) is a
// Householder QR of B^T followed by a one-sided Jacobi SVD of the q x q factor. The results
// agree with the torch path (LAPACK in the compute dtype) to rounding, up to the signs of
// singular vector pairs. A NaN or inf in a body's moment is an error naming the body, as
// torch's QR and SVD refuse one.
//
// Why: at 256 x 256 the torch path's range finder made ~60 small operators per moment and
// batch (QR, SVD, draws, products, copies), each a few microseconds of dispatch: half of a
// fused step (docs/BENCHMARKS.md).
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "skinny.h"

namespace {

using mlorc::cols_range;
using mlorc::for_dtype_and_width;
using mlorc::rows_range;

// ---------------------------------------------------------------- float64 small algebra
// Matrices here are column-major: column c of an (L, q) matrix is x[c * L .. c * L + L).

// x . y in independent vector accumulators (a single chain of dependent adds made these dots
// most of the small algebra's time); the same summation order on every call
double dot(const double* x, const double* y, int64_t len) {
  using V = Vec<double>;
  typename V::type acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * V::size <= len; i += 2 * V::size) {
    acc0 += V::load(x + i) * V::load(y + i);
    acc1 += V::load(x + i + V::size) * V::load(y + i + V::size);
  }
  for (; i + V::size <= len; i += V::size) acc0 += V::load(x + i) * V::load(y + i);
  double total = V::sum(acc0 + acc1);
  for (; i < len; ++i) total += x[i] * y[i];
  return total;
}

// Householder QR of x (L, q), L >= q, overwritten: basis (L, q) gets Q's orthonormal columns and
// r (q, q), when given, the upper triangle R of x scaled by 2^-exponent (x = Q R 2^exponent; the
// power of two brings the largest entry into [0.5, 1), exactly, so that no norm over- or
// underflows however large or small float64 entries are). A zero column gets no reflector (its
// column of Q is that of the identity, carried through the others): Q stays orthonormal.
// Returns false, computing nothing, when x has a non-finite entry.
bool householder_qr(double* x, int64_t len, int q, double* basis, double* r, int* exponent = nullptr) {
  double largest = 0;
  for (int64_t i = 0; i < len * q; ++i) {
    if (!std::isfinite(x[i])) return false;
    largest = std::max(largest, std::abs(x[i]));
  }
  int power = 0;
  if (largest > 0) {
    std::frexp(largest, &power);
    const double scale = std::ldexp(1.0, -power);
    for (int64_t i = 0; i < len * q; ++i) x[i] *= scale;
  }
  if (exponent) *exponent = power;
  std::vector<char> reflects(q, 0);
  for (int k = 0; k < q; ++k) {
    double* col = x + k * len + k;                 // x[k:, k], where reflector k is stored
    const int64_t tail = len - k;
    const double norm = std::sqrt(dot(col, col, tail));
    double diagonal = 0;
    if (norm > 0) {
      diagonal = col[0] >= 0 ? -norm : norm;       // the sign that avoids cancellation
      col[0] -= diagonal;
      const double scale = 1 / std::sqrt(dot(col, col, tail));
      for (int64_t i = 0; i < tail; ++i) col[i] *= scale;
      reflects[k] = 1;
      for (int c = k + 1; c < q; ++c) {            // (I - 2 v v^T) on the later columns
        double* other = x + c * len + k;
        const double d = 2 * dot(col, other, tail);
        for (int64_t i = 0; i < tail; ++i) other[i] -= d * col[i];
      }
    }
    if (r) {
      for (int c = 0; c < q; ++c) r[c * q + k] = c < k ? 0.0 : (c == k ? diagonal : x[c * len + k]);
    }
  }
  for (int c = 0; c < q; ++c)
    for (int64_t i = 0; i < len; ++i) basis[c * len + i] = i == c ? 1.0 : 0.0;
  for (int k = q - 1; k >= 0; --k) {               // Q = H_0 ... H_{q-1} I[:, :q]
    if (!reflects[k]) continue;
    const double* v = x + k * len + k;
    for (int c = 0; c < q; ++c) {
      double* out = basis + c * len + k;
      const double d = 2 * dot(v, out, len - k);
      for (int64_t i = 0; i < len - k; ++i) out[i] -= d * v[i];
    }
  }
  return true;
}

// One-sided (Hestenes) Jacobi: rotates the columns of c (q, q) until they are orthogonal,
// c V = U diag(sigma); on return c holds U diag(sigma), v the rotations V, sigma the column norms.
void jacobi_svd(double* c, int q, double* v, double* sigma) {
  for (int i = 0; i < q * q; ++i) v[i] = (i % (q + 1)) == 0 ? 1.0 : 0.0;
  for (int sweep = 0; sweep < 64; ++sweep) {
    bool rotated = false;
    for (int p = 0; p < q; ++p)
      for (int k = p + 1; k < q; ++k) {
        double* cp = c + p * q;
        double* ck = c + k * q;
        const double alpha = dot(cp, cp, q), beta = dot(ck, ck, q), gamma = dot(cp, ck, q);
        if (!(std::abs(gamma) > 1e-15 * std::sqrt(alpha) * std::sqrt(beta))) continue;   // orthogonal
        rotated = true;
        const double zeta = (beta - alpha) / (2 * gamma);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::abs(zeta) + std::sqrt(1 + zeta * zeta));
        const double cs = 1 / std::sqrt(1 + t * t), sn = cs * t;
        for (double* pair : {c, v}) {
          double* xp = pair + p * q;
          double* xk = pair + k * q;
          for (int i = 0; i < q; ++i) {
            const double a = xp[i], b = xk[i];
            xp[i] = cs * a - sn * b;
            xk[i] = sn * a + cs * b;
          }
        }
      }
    if (!rotated) break;
  }
  for (int k = 0; k < q; ++k) sigma[k] = std::sqrt(dot(c + k * q, c + k * q, q));
}

// order (q) of sigma descending (an insertion sort: q <= 8; NaN keeps its place)
void descending(const double* sigma, int q, int* order) {
  for (int i = 0; i < q; ++i) order[i] = i;
  for (int i = 1; i < q; ++i)
    for (int j = i; j > 0 && sigma[order[j]] > sigma[order[j - 1]]; --j) std::swap(order[j], order[j - 1]);
}

// The left singular vectors u (q, q) from c = U diag(sigma), in `order`: each column normalised
// and orthogonalised against the earlier ones (twice); a column with no direction of its own
// (sigma = 0) becomes the unit vector that is most orthogonal to them, so u stays orthonormal.
void left_vectors(const double* c, const double* sigma, const int* order, int q, double* u) {
  for (int idx = 0; idx < q; ++idx) {
    double* col = u + idx * q;
    const double s = sigma[order[idx]];
    for (int i = 0; i < q; ++i) col[i] = s > 0 ? c[order[idx] * q + i] / s : 0.0;
    auto orthogonalise = [&](double* x) {
      for (int pass = 0; pass < 2; ++pass)
        for (int j = 0; j < idx; ++j) {
          const double d = dot(u + j * q, x, q);
          for (int i = 0; i < q; ++i) x[i] -= d * u[j * q + i];
        }
      return std::sqrt(dot(x, x, q));
    };
    double norm = orthogonalise(col);
    if (!(norm > 0.5) && !std::isnan(norm)) {     // sigma = 0: no direction of its own
      double best = -1;
      std::vector<double> unit(q);
      for (int t = 0; t < q; ++t) {
        for (int i = 0; i < q; ++i) unit[i] = i == t ? 1.0 : 0.0;
        const double left = orthogonalise(unit.data());
        if (left > best) {
          best = left;
          std::copy(unit.begin(), unit.end(), col);
        }
      }
      norm = best;
    }
    for (int i = 0; i < q; ++i) col[i] /= norm;
  }
}

// ---------------------------------------------------------------- one body
template <typename T>
struct Body {
  const T* a;      // (m, n)
  const T* us;     // (m, r0) or null
  const T* vh;     // (r0, n) or null
  T* u_out;        // (m, rank)
  T* s_out;        // (rank)
  T* vh_out;       // (rank, n)
  const T* omega;  // (q, n): Omega^T
};

template <typename T, int Q>
class BodyRangeFinder {
 public:
  BodyRangeFinder(int64_t m, int64_t n, int64_t r0, double keep, double mix)
      : m_(m), n_(n), r0_(r0), keep_(keep), mix_(mix), y_(m * Q), z_(Q * n), basis_t_(m * Q),
        sketch_t_(Q * n), tall_(std::max(m, n) * Q), orth_(n * Q), basis_(m * Q), small_(r0 * Q) {}

  // false when a product came out non-finite (a NaN or inf in the moment): nothing to compress
  bool run(const Body<T>& body, int64_t niter, int64_t rank) {
    body_ = &body;
    times(body.omega);                            // Y = A Omega
    if (!orthonormal_rows()) return false;        // Q = orth(Y)
    for (int64_t it = 0; it < niter; ++it) {
      t_times();                                  // (Q^T A)^T
      load_transposed(z_.data(), n_);
      if (!householder_qr(tall_.data(), n_, Q, orth_.data(), nullptr)) return false;
      for (int c = 0; c < Q; ++c)                 // Z^T, as the next product's x^T
        for (int64_t j = 0; j < n_; ++j) sketch_t_[c * n_ + j] = T(orth_[c * n_ + j]);
      times(sketch_t_.data());
      if (!orthonormal_rows()) return false;
    }
    t_times();                                    // B = Q^T A (q, n)
    return small_svd(rank);
  }

 private:
  // y_ = A x for x given as xt (Q, n), then Y (m, Q) into tall_, column-major, in float64
  void times(const T* xt) {
    const Body<T>& b = *body_;
    at::parallel_for(0, m_, 64, [&](int64_t i, int64_t e) { rows_range<T, Q>(b.a, xt, y_.data(), n_, i, e); });
    double* vx = small_.data();                   // vh x (r0, Q)
    for (int64_t k = 0; k < r0_; ++k)
      for (int c = 0; c < Q; ++c) {
        double total = 0;
        for (int64_t j = 0; j < n_; ++j) total += double(b.vh[k * n_ + j]) * double(xt[c * n_ + j]);
        vx[k * Q + c] = total;
      }
    for (int64_t i = 0; i < m_; ++i)
      for (int c = 0; c < Q; ++c) {
        double extra = 0;
        for (int64_t k = 0; k < r0_; ++k) extra += double(b.us[i * r0_ + k]) * vx[k * Q + c];
        const double product = double(y_[i * Q + c]);
        tall_[c * m_ + i] = r0_ ? mix_ * product + keep_ * extra : product;
      }
  }

  // the basis of tall_ (m, Q) into basis_ (column-major) and basis_t_ (row-major, the cols
  // product's x)
  bool orthonormal_rows() {
    if (!householder_qr(tall_.data(), m_, Q, basis_.data(), nullptr)) return false;
    for (int64_t i = 0; i < m_; ++i)
      for (int c = 0; c < Q; ++c) basis_t_[i * Q + c] = T(basis_[c * m_ + i]);
    return true;
  }

  // z_ = Q^T A (Q, n), with the unformed term: mix (Q^T a) + keep (Q^T us) vh
  void t_times() {
    const Body<T>& b = *body_;
    at::parallel_for(0, n_, 512, [&](int64_t j, int64_t e) {
      cols_range<T, Q>(basis_t_.data(), b.a, z_.data(), m_, n_, j, e);
    });
    if (!r0_) return;
    double* qu = small_.data();                   // Q^T us (Q, r0)
    for (int c = 0; c < Q; ++c)
      for (int64_t k = 0; k < r0_; ++k) {
        double total = 0;
        for (int64_t i = 0; i < m_; ++i) total += basis_[c * m_ + i] * double(b.us[i * r0_ + k]);
        qu[c * r0_ + k] = total;
      }
    for (int c = 0; c < Q; ++c)
      for (int64_t j = 0; j < n_; ++j) {
        double extra = 0;
        for (int64_t k = 0; k < r0_; ++k) extra += qu[c * r0_ + k] * double(b.vh[k * n_ + j]);
        z_[c * n_ + j] = T(mix_ * double(z_[c * n_ + j]) + keep_ * extra);
      }
  }

  // rows of x (Q, n) row-major as the columns of tall_ (len, Q), column-major, in float64
  void load_transposed(const T* x, int64_t len) {
    for (int c = 0; c < Q; ++c)
      for (int64_t j = 0; j < len; ++j) tall_[c * len + j] = double(x[c * len + j]);
  }

  // B = z_ (Q, n) = U diag(s) Vh: B^T = Q2 R2, R2^T V = U diag(s) (Jacobi), Vh = (Q2 V)^T;
  // the first `rank` triplets, largest first, with U lifted back to m rows by the basis
  bool small_svd(int64_t rank) {
    const Body<T>& b = *body_;
    load_transposed(z_.data(), n_);
    double r2[Q * Q], c[Q * Q], v[Q * Q], u[Q * Q], sigma[Q];
    int order[Q], exponent = 0;
    if (!householder_qr(tall_.data(), n_, Q, orth_.data(), r2, &exponent)) return false;
    for (int i = 0; i < Q; ++i)
      for (int k = 0; k < Q; ++k) c[k * Q + i] = r2[i * Q + k];     // c = R2^T
    jacobi_svd(c, Q, v, sigma);
    descending(sigma, Q, order);
    left_vectors(c, sigma, order, Q, u);
    for (int64_t i = 0; i < m_; ++i)
      for (int64_t t = 0; t < rank; ++t) {
        double total = 0;
        for (int k = 0; k < Q; ++k) total += basis_[k * m_ + i] * u[t * Q + k];
        b.u_out[i * rank + t] = T(total);
      }
    for (int64_t t = 0; t < rank; ++t) {
      b.s_out[t] = T(std::ldexp(sigma[order[t]], exponent));    // R2 was of B 2^-exponent
      const double* rotation = v + order[t] * Q;
      for (int64_t j = 0; j < n_; ++j) {
        double total = 0;
        for (int k = 0; k < Q; ++k) total += orth_[k * n_ + j] * rotation[k];
        b.vh_out[t * n_ + j] = T(total);
      }
    }
    return true;
  }

  const int64_t m_, n_, r0_;
  const double keep_, mix_;
  const Body<T>* body_ = nullptr;
  std::vector<T> y_, z_, basis_t_, sketch_t_;
  std::vector<double> tall_;    // the matrix to orthonormalise next, (m or n, Q)
  std::vector<double> orth_;    // Z, then Q2 of B^T: (n, Q)
  std::vector<double> basis_;   // Q: (m, Q)
  std::vector<double> small_;   // vh x or Q^T us: (r0, Q)
};

void check_operand(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == like.scalar_type(),
              "range_finder: ", name, " must be a contiguous 3-D CPU tensor of a's dtype");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> range_finder(const at::Tensor& a, const at::Tensor& us,
                                                            const at::Tensor& vh, double keep, double mix,
                                                            const std::vector<int64_t>& seeds, int64_t q,
                                                            int64_t niter, int64_t rank) {
  TORCH_CHECK(a.dim() == 3 && a.is_contiguous() && a.device().is_cpu() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "range_finder: a must be a contiguous (B, m, n) float32/float64 CPU tensor");
  const int64_t batch = a.size(0), m = a.size(1), n = a.size(2);
  const bool unformed = us.numel() > 0 || vh.numel() > 0;
  int64_t r0 = 0;
  if (unformed) {
    check_operand(us, a, "us");
    check_operand(vh, a, "vh");
    r0 = us.size(2);
    TORCH_CHECK(us.size(0) == batch && us.size(1) == m && vh.size(0) == batch && vh.size(1) == r0 &&
                    vh.size(2) == n,
                "range_finder: us (B, m, r) and vh (B, r, n) must make keep us vh + mix a with a (B, m, n)");
  } else {
    TORCH_CHECK(keep == 0 && mix == 1, "range_finder: with no factors the moment is a itself (keep 0, mix 1)");
  }
  TORCH_CHECK(batch >= 1 && int64_t(seeds.size()) == batch, "range_finder: one seed per body, got ",
              seeds.size(), " for ", batch);
  TORCH_CHECK(q >= 1 && q <= std::min<int64_t>(m, n), "range_finder: sketch width ", q, " outside 1..min(m, n)");
  TORCH_CHECK(niter >= 0 && rank >= 1, "range_finder: niter >= 0 and rank >= 1");
  const int64_t r = std::min(rank, q);
  auto u_out = at::empty({batch, m, r}, a.options());
  auto s_out = at::empty({batch, r}, a.options());
  auto vh_out = at::empty({batch, r, n}, a.options());
  // Omega^T per body, drawn as lowrank.gaussian_test_matrix draws Omega (before any thread starts)
  auto omegas = at::empty({batch, q, n}, a.options());
  for (int64_t b = 0; b < batch; ++b) {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seeds[b]));
    omegas[b].copy_(at::randn({n, q}, generator, at::TensorOptions().dtype(at::kDouble)).t());
  }
  std::atomic<int64_t> non_finite{-1};
  for_dtype_and_width(a, q, [&](auto tag, auto width) {
    using T = typename decltype(tag)::type;
    constexpr int Q = decltype(width)::value;
    // bodies in parallel when there are several (each body's products then run on one thread);
    // a lone body runs its products in parallel instead
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      BodyRangeFinder<T, Q> finder(m, n, r0, keep, mix);
      for (int64_t b = begin; b < end; ++b) {
        const Body<T> body{a.data_ptr<T>() + b * m * n,
                           unformed ? us.data_ptr<T>() + b * m * r0 : nullptr,
                           unformed ? vh.data_ptr<T>() + b * r0 * n : nullptr,
                           u_out.data_ptr<T>() + b * m * r,
                           s_out.data_ptr<T>() + b * r,
                           vh_out.data_ptr<T>() + b * r * n,
                           omegas.data_ptr<T>() + b * q * n};
        if (!finder.run(body, niter, r)) non_finite = b;
      }
    });
  });
  TORCH_CHECK(non_finite.load() < 0, "range_finder: the moment of body ", non_finite.load(),
              " of the batch is not finite (a NaN or inf): it cannot be compressed (torch's QR and SVD "
              "refuse it too)");
  return {u_out, s_out, vh_out};
}
