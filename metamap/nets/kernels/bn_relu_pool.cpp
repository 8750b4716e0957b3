// Batch norm with batch statistics + 2x2 max-pool + ReLU in two passes, for the later blocks of a
// network whose feature maps are grouped per task (one channel per task and feature).
//
// PyTorch runs this block as a normalisation that writes the full-size map, a pooling that reads it,
// and in the backward pass a zero fill, a scatter of the pooled gradient and a batch-norm backward
// that reads everything again. Here the forward pass reads the convolution's output twice (its
// statistics, then the pooling) and writes only the quarter-size result and the winners' window
// positions; the backward pass reads the quarter-size gradient for two sums per channel and writes
// the full-size gradient once. Batch norm's affine map is increasing per channel where gamma >= 0
// and decreasing where gamma < 0, so it commutes with max- (resp. min-) pooling of the raw input:
// relu(max_pool(gamma * xhat + beta)) = relu(gamma * xhat(winner) + beta).
//
// The backward pass here is for passes whose graph is differentiated once (MAML's query pass); the
// Python side computes the same formulas in differentiable operations where a graph of the backward
// pass is built (MAML's inner steps).
//
// Shapes: z [N, H, W, K] contiguous (a channels-last [N, K, H, W] map), gamma, beta [K];
// y and idx [N, Ho, Wo, K] with Ho = H / 2, Wo = W / 2 (floor, as max_pool2d(2)); mean, rstd [K].
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Shape {
  int64_t N, H, W, K, Ho, Wo;
};

Shape shape_of(const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 4 && z.is_contiguous(), "z must be a contiguous [N, H, W, K] tensor");
  Shape s{z.size(0), z.size(1), z.size(2), z.size(3), z.size(1) / 2, z.size(2) / 2};
  TORCH_CHECK(s.Ho > 0 && s.Wo > 0, "maps smaller than the 2x2 pooling window");
  return s;
}

// Sums over fixed blocks of images, added in block order: the same result whatever the number of
// threads. fn(n, acc) adds image n's contribution to acc [width].
template <typename Fn>
std::vector<double> blocked_sums(int64_t N, int64_t width, Fn fn) {
  const int64_t blocks = std::min<int64_t>(N, 16), size = (N + blocks - 1) / blocks;
  std::vector<double> partial(blocks * width, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b)
      for (int64_t n = b * size; n < std::min(N, (b + 1) * size); ++n) fn(n, partial.data() + b * width);
  });
  std::vector<double> total(width, 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t k = 0; k < width; ++k) total[k] += partial[b * width + k];
  return total;
}

template <typename scalar_t>
void forward_impl(const scalar_t* z, const scalar_t* gamma, const scalar_t* beta, double eps, const Shape& s,
                  scalar_t* y, uint8_t* idx, scalar_t* mean_out, scalar_t* rstd_out) {
  const int64_t K = s.K, plane = s.H * s.W * K;
  // Per channel sum and sum of squares, accumulated in double.
  const std::vector<double> sums = blocked_sums(s.N, 2 * K, [&](int64_t n, double* acc) {
    const scalar_t* zn = z + n * plane;
    for (int64_t p = 0; p < s.H * s.W; ++p) {
      const scalar_t* row = zn + p * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const double v = row[k];
        acc[k] += v;
        acc[K + k] += v * v;
      }
    }
  });
  const double count = static_cast<double>(s.N * s.H * s.W);
  // The output is centred before it is scaled: u = ((z - mean_hi) - mean_lo) * scale + beta, the
  // double mean split into two working-precision parts (z - mean_hi is exact near the mean). Written
  // as scale * z + (beta - scale * mean), a channel whose mean is large against its spread lost the
  // ReLU's sign to the cancellation (a sign flipped against float64 changes a task's whole
  // adaptation). All in the working precision, so that the loop below stays vectorised.
  std::vector<scalar_t> centre(K), centre_lo(K), scale(K), offset(K), sign(K);
  for (int64_t k = 0; k < K; ++k) {
    const double mean = sums[k] / count;
    const double var = std::max(sums[K + k] / count - mean * mean, 0.0);
    const double rstd = 1.0 / std::sqrt(var + eps);
    mean_out[k] = static_cast<scalar_t>(mean);
    rstd_out[k] = static_cast<scalar_t>(rstd);
    centre[k] = static_cast<scalar_t>(mean);
    centre_lo[k] = static_cast<scalar_t>(mean - static_cast<double>(centre[k]));
    scale[k] = static_cast<scalar_t>(gamma[k] * rstd);
    offset[k] = beta[k];
    sign[k] = gamma[k] < 0 ? scalar_t(-1) : scalar_t(1);               // pool sign * z by its maximum
  }
  const scalar_t* ce = centre.data();
  const scalar_t* cl = centre_lo.data();
  const scalar_t* sc = scale.data();
  const scalar_t* of = offset.data();
  const scalar_t* sg = sign.data();
  at::parallel_for(0, s.N * s.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ni = begin; ni < end; ++ni) {
      const int64_t n = ni / s.Ho, i = ni % s.Ho;
      for (int64_t j = 0; j < s.Wo; ++j) {
        const scalar_t* p0 = z + ((n * s.H + 2 * i) * s.W + 2 * j) * K;
        const scalar_t* p1 = p0 + K;
        const scalar_t* p2 = p0 + s.W * K;
        const scalar_t* p3 = p2 + K;
        scalar_t* yo = y + ((n * s.Ho + i) * s.Wo + j) * K;
        uint8_t* io = idx + ((n * s.Ho + i) * s.Wo + j) * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          // The first extremum in row-major window order, as max_pool2d picks it; no branches.
          scalar_t best = sg[k] * p0[k], win = p0[k], w = 0;
          scalar_t t = sg[k] * p1[k];
          scalar_t u = static_cast<scalar_t>(t > best);
          w += u * (1 - w), win += u * (p1[k] - win), best = std::max(best, t);
          t = sg[k] * p2[k];
          u = static_cast<scalar_t>(t > best);
          w += u * (2 - w), win += u * (p2[k] - win), best = std::max(best, t);
          t = sg[k] * p3[k];
          u = static_cast<scalar_t>(t > best);
          w += u * (3 - w), win += u * (p3[k] - win), best = std::max(best, t);
          yo[k] = std::max(((win - ce[k]) - cl[k]) * sc[k] + of[k], scalar_t(0));
          io[k] = static_cast<uint8_t>(w);
        }
      }
    }
  });
}

// One pooling window of every channel: adds gu (the gradient through the ReLU) to sb and
// gu * xhat(winner) to sx. (Kept out of line, with __restrict__ pointers and an int window index,
// so that the compiler vectorises the loop over channels: inlined into the loops below it did not.)
template <typename scalar_t>
__attribute__((noinline)) void window_sums(const scalar_t* __restrict__ y, const scalar_t* __restrict__ gy,
                        const uint8_t* __restrict__ idx, const scalar_t* __restrict__ p0,
                        const scalar_t* __restrict__ p1, const scalar_t* __restrict__ p2,
                        const scalar_t* __restrict__ p3, const scalar_t* __restrict__ mean,
                        const scalar_t* __restrict__ rstd, scalar_t* __restrict__ sb, scalar_t* __restrict__ sx,
                        int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t g = y[k] > scalar_t(0) ? gy[k] : scalar_t(0);
    const int q = idx[k];
    const scalar_t zw = q == 0 ? p0[k] : q == 1 ? p1[k] : q == 2 ? p2[k] : p3[k];
    sb[k] += g;
    sx[k] += g * ((zw - mean[k]) * rstd[k]);
  }
}

// The input gradient at the four positions of one pooling window: a * gu at the winner, plus the
// dense part b0 + b1 * (z - mean) everywhere (centred, as in the forward pass).
template <typename scalar_t>
__attribute__((noinline)) void window_grads(const scalar_t* __restrict__ y, const scalar_t* __restrict__ gy,
                         const uint8_t* __restrict__ idx, const scalar_t* __restrict__ a,
                         const scalar_t* __restrict__ b0, const scalar_t* __restrict__ b1,
                         const scalar_t* __restrict__ mean, const scalar_t* __restrict__ z0, const scalar_t* __restrict__ z1,
                         const scalar_t* __restrict__ z2, const scalar_t* __restrict__ z3,
                         scalar_t* __restrict__ g0, scalar_t* __restrict__ g1, scalar_t* __restrict__ g2,
                         scalar_t* __restrict__ g3, int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t g = y[k] > scalar_t(0) ? a[k] * gy[k] : scalar_t(0);
    const int q = idx[k];
    g0[k] = (q == 0 ? g : scalar_t(0)) + b0[k] + b1[k] * (z0[k] - mean[k]);
    g1[k] = (q == 1 ? g : scalar_t(0)) + b0[k] + b1[k] * (z1[k] - mean[k]);
    g2[k] = (q == 2 ? g : scalar_t(0)) + b0[k] + b1[k] * (z2[k] - mean[k]);
    g3[k] = (q == 3 ? g : scalar_t(0)) + b0[k] + b1[k] * (z3[k] - mean[k]);
  }
}

template <typename scalar_t>
void backward_impl(const scalar_t* gy, const scalar_t* z, const scalar_t* y, const uint8_t* idx,
                   const scalar_t* gamma, const scalar_t* mean, const scalar_t* rstd, const Shape& s, scalar_t* gz,
                   scalar_t* ggamma, scalar_t* gbeta) {
  const int64_t K = s.K;
  // Through the ReLU (gu), then per channel: d/dbeta = sum gu, d/dgamma = sum gu * xhat(winner).
  const std::vector<double> sums = blocked_sums(s.N, 2 * K, [&](int64_t n, double* acc) {
    std::vector<scalar_t> local(2 * K, scalar_t(0));
    for (int64_t i = 0; i < s.Ho; ++i)
      for (int64_t j = 0; j < s.Wo; ++j) {
        const int64_t o = ((n * s.Ho + i) * s.Wo + j) * K;
        const scalar_t* p0 = z + ((n * s.H + 2 * i) * s.W + 2 * j) * K;
        window_sums(y + o, gy + o, idx + o, p0, p0 + K, p0 + s.W * K, p0 + (s.W + 1) * K, mean, rstd, local.data(),
                    local.data() + K, K);
      }
    for (int64_t k = 0; k < 2 * K; ++k) acc[k] += local[k];
  });
  const double count = static_cast<double>(s.N * s.H * s.W);
  // gz = gamma * rstd * (S - gbeta / n - xhat * ggamma / n), S the pooled gradient at the winners:
  // gz = a * S + (b0 + b1 * (z - mean)) per channel.
  std::vector<scalar_t> a(K), b0(K), b1(K);
  for (int64_t k = 0; k < K; ++k) {
    gbeta[k] = static_cast<scalar_t>(sums[k]);
    ggamma[k] = static_cast<scalar_t>(sums[K + k]);
    const double ak = static_cast<double>(gamma[k]) * rstd[k], ck = sums[K + k] / count * rstd[k];
    a[k] = static_cast<scalar_t>(ak);
    b0[k] = static_cast<scalar_t>(-ak * sums[k] / count);
    b1[k] = static_cast<scalar_t>(-ak * ck);
  }
  const scalar_t* pa = a.data();
  const scalar_t* pb0 = b0.data();
  const scalar_t* pb1 = b1.data();
  // Pooling windows first (four positions each), then the rows and columns no window covers.
  at::parallel_for(0, s.N * s.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ni = begin; ni < end; ++ni) {
      const int64_t n = ni / s.Ho, i = ni % s.Ho;
      for (int64_t j = 0; j < s.Wo; ++j) {
        const int64_t o = ((n * s.Ho + i) * s.Wo + j) * K;
        const int64_t q0 = ((n * s.H + 2 * i) * s.W + 2 * j) * K, q1 = q0 + K, q2 = q0 + s.W * K, q3 = q2 + K;
        window_grads(y + o, gy + o, idx + o, pa, pb0, pb1, mean, z + q0, z + q1, z + q2, z + q3, gz + q0, gz + q1, gz + q2,
                     gz + q3, K);
      }
    }
  });
  auto dense = [&](int64_t n, int64_t r, int64_t col) {
    const int64_t p = ((n * s.H + r) * s.W + col) * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) gz[p + k] = pb0[k] + pb1[k] * (z[p + k] - mean[k]);
  };
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t r = 2 * s.Ho; r < s.H; ++r)
      for (int64_t col = 0; col < s.W; ++col) dense(n, r, col);
    for (int64_t r = 0; r < 2 * s.Ho; ++r)
      for (int64_t col = 2 * s.Wo; col < s.W; ++col) dense(n, r, col);
  }
}

std::vector<at::Tensor> forward(const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  const Shape s = shape_of(z);
  TORCH_CHECK(gamma.is_contiguous() && beta.is_contiguous() && gamma.numel() == s.K && beta.numel() == s.K,
              "gamma and beta must be contiguous [K] tensors");
  auto y = at::empty({s.N, s.Ho, s.Wo, s.K}, z.options());
  auto idx = at::empty({s.N, s.Ho, s.Wo, s.K}, z.options().dtype(at::kByte));
  auto mean = at::empty({s.K}, z.options());
  auto rstd = at::empty({s.K}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu_pool_forward", [&] {
    forward_impl<scalar_t>(z.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), eps, s,
                           y.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(), mean.data_ptr<scalar_t>(),
                           rstd.data_ptr<scalar_t>());
  });
  return {y, idx, mean, rstd};
}

std::vector<at::Tensor> backward(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& y, const at::Tensor& idx,
                                 const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd) {
  const Shape s = shape_of(z);
  TORCH_CHECK(gy.is_contiguous() && y.is_contiguous() && idx.is_contiguous(), "gy, y and idx must be contiguous");
  TORCH_CHECK(gy.numel() == s.N * s.Ho * s.Wo * s.K, "gy must be [N, Ho, Wo, K]");
  auto gz = at::empty_like(z);
  auto ggamma = at::empty({s.K}, z.options());
  auto gbeta = at::empty({s.K}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu_pool_backward", [&] {
    backward_impl<scalar_t>(gy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            idx.data_ptr<uint8_t>(), gamma.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                            rstd.data_ptr<scalar_t>(), s, gz.data_ptr<scalar_t>(), ggamma.data_ptr<scalar_t>(),
                            gbeta.data_ptr<scalar_t>());
  });
  return {gz, ggamma, gbeta};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "batch norm (batch statistics) + 2x2 max-pool + ReLU: (y, idx, mean, rstd)");
  m.def("backward", &backward, "gradients of z, gamma and beta");
}
