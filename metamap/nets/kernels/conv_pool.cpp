// Per-task convolution + bias + 2x2 max-pool + ReLU in one pass, for a network's first layer.
//
// A first layer sees few values per output (a grey 3x3 patch has 9), so its convolution costs
// little arithmetic but writes the largest feature map of the network, which pooling then reads
// back, and whose gradient the backward pass fills, scatters into and reads again. Here each
// pooled output computes its four convolution values in registers and keeps only the winner and
// its position: the full-resolution map never exists. The backward pass gives the gradients of
// the kernel and bias (the input is data, never differentiated), and masked_forward the
// derivative of that backward pass, for second-order meta-gradients.
//
// Shapes: x [N, T, Cin, H + 2 pad, W + 2 pad] (contiguous, zero-padded), w [T, D, C] with D = Cin * KH * KW, b [T, C];
// out and argmax idx [N, Ho, Wo, T, C] (channels last), Ho = (H + 2 pad - KH + 1) / 2.
//
// The forward pass also runs "wide": float data with a double kernel and bias, summed in double and
// rounded once to a float output. Its pooling winners and ReLU signs are then those of the double
// computation: a winner or sign that float rounding flips changes a task's whole adaptation, and the
// first layer, with the largest maps, holds most of the near-ties.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

namespace {

struct Geometry {
  int64_t N, T, Cin, H, W, C, KH, KW, pad, Ho, Wo, D;
};

// The four patches under pooled output (i, j) of the (pre-padded) image xs, as patch[k * D + d].
template <typename scalar_t>
inline void gather_patches(const scalar_t* __restrict__ xs, const Geometry& g, int64_t i, int64_t j,
                           scalar_t* __restrict__ patch) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  for (int64_t k = 0; k < 4; ++k) {
    const int64_t oy = 2 * i + k / 2, ox = 2 * j + k % 2;
    scalar_t* p = patch + k * g.D;
    for (int64_t ci = 0; ci < g.Cin; ++ci)
      for (int64_t ky = 0; ky < g.KH; ++ky) {
        const scalar_t* row = xs + (ci * Hp + oy + ky) * Wp + ox;
        for (int64_t kx = 0; kx < g.KW; ++kx) *p++ = row[kx];
      }
  }
}

// Channels are processed in blocks of kBlock so that the four running sums stay in registers.
constexpr int64_t kBlock = 16;

// The four convolution values under one pooling window (s0..s3, window positions in row-major
// order) for the channels [c0, c0 + nb) of the kernel ws [D, C].
// The patches are data (scalar_t); the kernel and the sums are wide_t (scalar_t, or double for a wide pass).
template <typename scalar_t, typename wide_t, int64_t NB, bool Full>
inline void window_sums(const scalar_t* __restrict__ patch, const wide_t* __restrict__ ws, const Geometry& g,
                        int64_t c0, int64_t nb, wide_t* __restrict__ s0, wide_t* __restrict__ s1,
                        wide_t* __restrict__ s2, wide_t* __restrict__ s3) {
  for (int64_t c = 0; c < NB; ++c) s0[c] = s1[c] = s2[c] = s3[c] = wide_t(0);
  for (int64_t d = 0; d < g.D; ++d) {
    const wide_t p0 = patch[d], p1 = patch[g.D + d], p2 = patch[2 * g.D + d], p3 = patch[3 * g.D + d];
    const wide_t* __restrict__ wd = ws + d * g.C + c0;
#pragma omp simd
    for (int64_t c = 0; c < NB; ++c) {
      const wide_t wc = Full || c < nb ? wd[c] : wide_t(0);
      s0[c] += p0 * wc;
      s1[c] += p1 * wc;
      s2[c] += p2 * wc;
      s3[c] += p3 * wc;
    }
  }
}

// Calls block(patch, ws, bs, o, c0, nb, full) for every image n, task t, pooled output (i, j)
// and channel block, with the four patches under that output gathered, ws / bs task t's kernel
// [D, C] and bias [C] of (w, b), and o the output's offset in an [N, Ho, Wo, T, C] tensor.
template <typename scalar_t, typename wide_t, typename Block>
void for_each_window(const scalar_t* x, const wide_t* w, const wide_t* b, const Geometry& g, Block block) {
  const int64_t image = g.Cin * (g.H + 2 * g.pad) * (g.W + 2 * g.pad);
  at::parallel_for(0, g.N * g.T, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> patch(4 * g.D);
    for (int64_t nt = begin; nt < end; ++nt) {
      const int64_t n = nt / g.T, t = nt % g.T;
      const wide_t* ws = w + t * g.D * g.C;
      const wide_t* bs = b + t * g.C;
      for (int64_t i = 0; i < g.Ho; ++i) {
        for (int64_t j = 0; j < g.Wo; ++j) {
          gather_patches(x + nt * image, g, i, j, patch.data());
          const int64_t o = (((n * g.Ho + i) * g.Wo + j) * g.T + t) * g.C;
          for (int64_t c0 = 0; c0 < g.C; c0 += kBlock)
            block(patch.data(), ws, bs, o, c0, std::min(kBlock, g.C - c0));
        }
      }
    }
  });
}

// The pooled outputs of channels [c0, c0 + nb) at one position: max of the four sums, bias,
// ReLU, and which window position won.
template <typename scalar_t, typename wide_t, bool Full>
inline void forward_block(const scalar_t* patch, const wide_t* ws, const wide_t* __restrict__ bs,
                          scalar_t* __restrict__ out, uint8_t* __restrict__ idx, const Geometry& g, int64_t c0,
                          int64_t nb) {
  wide_t s0[kBlock], s1[kBlock], s2[kBlock], s3[kBlock], v[kBlock], k[kBlock];
  window_sums<scalar_t, wide_t, kBlock, Full>(patch, ws, g, c0, nb, s0, s1, s2, s3);
#pragma omp simd
  for (int64_t c = 0; c < kBlock; ++c) {
    // The first maximum in row-major window order, as max_pool2d picks it. Written without
    // branches (the winner is random: mispredicted branches cost more than the arithmetic).
    wide_t best = s0[c], kc = 0, u;
    u = static_cast<wide_t>(s1[c] > best);
    kc += u * (1 - kc);
    best = std::max(best, s1[c]);
    u = static_cast<wide_t>(s2[c] > best);
    kc += u * (2 - kc);
    best = std::max(best, s2[c]);
    u = static_cast<wide_t>(s3[c] > best);
    kc += u * (3 - kc);
    best = std::max(best, s3[c]);
    const wide_t y = best + (Full || c < nb ? bs[c0 + c] : wide_t(0));
    v[c] = std::max(y, wide_t(0));
    k[c] = kc;
  }
  for (int64_t c = 0; c < (Full ? kBlock : nb); ++c) {
    out[c0 + c] = static_cast<scalar_t>(v[c]);
    idx[c0 + c] = static_cast<uint8_t>(k[c]);
  }
}

template <typename scalar_t, typename wide_t>
void forward_impl(const scalar_t* x, const wide_t* w, const wide_t* b, scalar_t* out, uint8_t* idx,
                  const Geometry& g) {
  for_each_window(x, w, b, g, [&](const scalar_t* patch, const wide_t* ws, const wide_t* bs, int64_t o,
                                  int64_t c0, int64_t nb) {
    if (nb == kBlock)
      forward_block<scalar_t, wide_t, true>(patch, ws, bs, out + o, idx + o, g, c0, nb);
    else
      forward_block<scalar_t, wide_t, false>(patch, ws, bs, out + o, idx + o, g, c0, nb);
  });
}

// Adds image n's contribution for task t to acc [D + 1, C] (rows 0..D-1: the kernel, row D:
// the bias). patch [4 D] and gk [4 C] are scratch space. The sums over every position of every
// image run in double precision (each product in the working precision) because MAML's inner steps
// magnify their rounding: in float32 they erred by 5e-7 (relative) on 80 Gaussian 28x28 images, in
// double by 7e-8, for 5 % more time in this pass.
template <typename scalar_t>
void accumulate_image(const scalar_t* gout, const scalar_t* xs, const scalar_t* out, const uint8_t* idx,
                      double* __restrict__ acc, scalar_t* patch, scalar_t* gk, const Geometry& g, int64_t n,
                      int64_t t) {
  double* __restrict__ accb = acc + g.D * g.C;
  scalar_t* __restrict__ g0 = gk;
  scalar_t* __restrict__ g1 = g0 + g.C;
  scalar_t* __restrict__ g2 = g1 + g.C;
  scalar_t* __restrict__ g3 = g2 + g.C;
  for (int64_t i = 0; i < g.Ho; ++i) {
    for (int64_t j = 0; j < g.Wo; ++j) {
      const int64_t o = (((n * g.Ho + i) * g.Wo + j) * g.T + t) * g.C;
      const scalar_t* __restrict__ go = gout + o;
      const scalar_t* __restrict__ oo = out + o;
      const uint8_t* __restrict__ io = idx + o;
      scalar_t mass = 0;
#pragma omp simd reduction(+ : mass)
      for (int64_t c = 0; c < g.C; ++c) {
        // The ReLU passes the gradient where its output is positive; the pool routes it to the
        // window position that won.
        const scalar_t v = oo[c] > scalar_t(0) ? go[c] : scalar_t(0);
        const int32_t k = io[c];
        g0[c] = k == 0 ? v : scalar_t(0);
        g1[c] = k == 1 ? v : scalar_t(0);
        g2[c] = k == 2 ? v : scalar_t(0);
        g3[c] = k == 3 ? v : scalar_t(0);
        accb[c] += v;
        mass += v < scalar_t(0) ? -v : v;
      }
      if (mass == scalar_t(0)) continue;       // every unit of this position is off
      gather_patches(xs, g, i, j, patch);
      for (int64_t d = 0; d < g.D; ++d) {
        const scalar_t p0 = patch[d], p1 = patch[g.D + d], p2 = patch[2 * g.D + d], p3 = patch[3 * g.D + d];
        double* __restrict__ ad = acc + d * g.C;
#pragma omp simd
        for (int64_t c = 0; c < g.C; ++c)
          ad[c] += static_cast<double>(p0 * g0[c] + p1 * g1[c] + p2 * g2[c] + p3 * g3[c]);
      }
    }
  }
}

// gw [T, D, C] and gb [T, C] from the per-block sums partial [blocks, T, D + 1, C], added in block
// order in double precision and rounded once.
template <typename scalar_t>
void reduce_blocks(const std::vector<double>& partial, int64_t blocks, scalar_t* gw, scalar_t* gb, const Geometry& g) {
  const int64_t rows = g.D + 1, per = g.T * rows * g.C;
  std::vector<double> total(per, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t e = 0; e < per; ++e) total[e] += partial[blk * per + e];
  for (int64_t t = 0; t < g.T; ++t) {
    for (int64_t d = 0; d < g.D; ++d)
      for (int64_t c = 0; c < g.C; ++c) gw[(t * g.D + d) * g.C + c] = static_cast<scalar_t>(total[(t * rows + d) * g.C + c]);
    for (int64_t c = 0; c < g.C; ++c) gb[t * g.C + c] = static_cast<scalar_t>(total[(t * rows + g.D) * g.C + c]);
  }
}

template <typename scalar_t>
void backward_impl(const scalar_t* gout, const scalar_t* x, const scalar_t* out, const uint8_t* idx,
                   scalar_t* gw, scalar_t* gb, const Geometry& g) {
  // The images are split into a fixed number of blocks, each accumulating into its own
  // [T, D + 1, C] buffer, summed in block order at the end: no shared writes, no reliance on
  // thread ids, and the same result whatever the number of threads.
  const int64_t rows = g.D + 1, per = g.T * rows * g.C;
  const int64_t image = g.Cin * (g.H + 2 * g.pad) * (g.W + 2 * g.pad);
  const int64_t blocks = std::min<int64_t>(g.N, 16), size = (g.N + blocks - 1) / blocks;
  std::vector<double> partial(blocks * per, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<scalar_t> patch(4 * g.D), gk(4 * g.C);
    for (int64_t blk = first; blk < last; ++blk)
      for (int64_t n = blk * size; n < std::min(g.N, (blk + 1) * size); ++n)
        for (int64_t t = 0; t < g.T; ++t)
          accumulate_image(gout, x + (n * g.T + t) * image, out, idx, partial.data() + blk * per + t * rows * g.C,
                           patch.data(), gk.data(), g, n, t);
  });
  reduce_blocks(partial, blocks, gw, gb, g);
}

// The derivative of backward() with respect to the incoming gradient, applied to (vw, vb): the
// convolution of kernel vw at each pooled output's winning position, plus vb, where the ReLU
// was on (zero elsewhere). MAML's second-order terms need it; the pooling choice and ReLU mask
// are locally constant, so nothing else enters.
template <typename scalar_t, bool Full>
inline void masked_block(const scalar_t* patch, const scalar_t* ws, const scalar_t* __restrict__ bs,
                         const scalar_t* __restrict__ out, const uint8_t* __restrict__ idx,
                         scalar_t* __restrict__ res, const Geometry& g, int64_t c0, int64_t nb) {
  scalar_t s0[kBlock], s1[kBlock], s2[kBlock], s3[kBlock];
  window_sums<scalar_t, scalar_t, kBlock, Full>(patch, ws, g, c0, nb, s0, s1, s2, s3);
  for (int64_t c = 0; c < (Full ? kBlock : nb); ++c) {
    const uint8_t k = idx[c0 + c];
    const scalar_t v = k == 0 ? s0[c] : k == 1 ? s1[c] : k == 2 ? s2[c] : s3[c];
    res[c0 + c] = out[c0 + c] > scalar_t(0) ? v + bs[c0 + c] : scalar_t(0);
  }
}

template <typename scalar_t>
void masked_forward_impl(const scalar_t* x, const scalar_t* vw, const scalar_t* vb, const scalar_t* out,
                         const uint8_t* idx, scalar_t* res, const Geometry& g) {
  for_each_window(x, vw, vb, g, [&](const scalar_t* patch, const scalar_t* ws, const scalar_t* bs, int64_t o,
                                    int64_t c0, int64_t nb) {
    if (nb == kBlock)
      masked_block<scalar_t, true>(patch, ws, bs, out + o, idx + o, res + o, g, c0, nb);
    else
      masked_block<scalar_t, false>(patch, ws, bs, out + o, idx + o, res + o, g, c0, nb);
  });
}

#if defined(__AVX512F__)
// AVX-512 paths for the common first layer -- one grey input channel, a 3x3 kernel, float, channels in
// multiples of 32 -- that keep a 32-channel slice of the kernel in registers while they sweep over an
// image: 72 fused multiply-adds per pooled output for 36 broadcasts of input pixels, instead of the
// generic loops' gathered patches and per-tap weight loads.
bool grey3x3(const Geometry& g) { return g.Cin == 1 && g.KH == 3 && g.KW == 3 && g.C % 32 == 0; }

void forward_grey3x3(const float* x, const float* w, const float* b, float* out, uint8_t* idx, const Geometry& g) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  at::parallel_for(0, g.N * g.T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt) {
      const int64_t n = nt / g.T, t = nt % g.T;
      const float* xs = x + nt * Hp * Wp;
      for (int64_t c0 = 0; c0 < g.C; c0 += 32) {
        __m512 w0[9], w1[9];
        for (int d = 0; d < 9; ++d) {
          w0[d] = _mm512_loadu_ps(w + (t * 9 + d) * g.C + c0);
          w1[d] = _mm512_loadu_ps(w + (t * 9 + d) * g.C + c0 + 16);
        }
        const __m512 b0 = _mm512_loadu_ps(b + t * g.C + c0), b1 = _mm512_loadu_ps(b + t * g.C + c0 + 16);
        for (int64_t i = 0; i < g.Ho; ++i) {
          for (int64_t j = 0; j < g.Wo; ++j) {
            const float* r = xs + 2 * i * Wp + 2 * j;        // the 4x4 input region of the window
            __m512 a0[4], a1[4];
            for (int k = 0; k < 4; ++k) a0[k] = a1[k] = _mm512_setzero_ps();
            for (int ky = 0; ky < 3; ++ky)
              for (int kx = 0; kx < 3; ++kx) {
                const int d = ky * 3 + kx;
                for (int k = 0; k < 4; ++k) {
                  const __m512 v = _mm512_set1_ps(r[((k >> 1) + ky) * Wp + (k & 1) + kx]);
                  a0[k] = _mm512_fmadd_ps(v, w0[d], a0[k]);
                  a1[k] = _mm512_fmadd_ps(v, w1[d], a1[k]);
                }
              }
            const int64_t o = (((n * g.Ho + i) * g.Wo + j) * g.T + t) * g.C + c0;
            for (int h = 0; h < 2; ++h) {
              const __m512* a = h == 0 ? a0 : a1;
              // The first maximum in row-major window order, as max_pool2d picks it.
              __m512 best = a[0];
              __m512i win = _mm512_setzero_si512();
              for (int k = 1; k < 4; ++k) {
                const __mmask16 m = _mm512_cmp_ps_mask(a[k], best, _CMP_GT_OQ);
                best = _mm512_mask_mov_ps(best, m, a[k]);
                win = _mm512_mask_mov_epi32(win, m, _mm512_set1_epi32(k));
              }
              const __m512 y = _mm512_max_ps(_mm512_add_ps(best, h == 0 ? b0 : b1), _mm512_setzero_ps());
              _mm512_storeu_ps(out + o + 16 * h, y);
              _mm_storeu_si128(reinterpret_cast<__m128i*>(idx + o + 16 * h), _mm512_cvtepi32_epi8(win));
            }
          }
        }
      }
    }
  });
}

// forward_grey3x3 for a wide pass: float images, a double kernel and bias, double sums (16-channel
// slices: 18 kernel registers of 8 doubles), rounded once to the float output.
void forward_grey3x3_wide(const float* x, const double* w, const double* b, float* out, uint8_t* idx,
                          const Geometry& g) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  at::parallel_for(0, g.N * g.T, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> image(Hp * Wp);     // the image in double once, so that broadcasts load directly
    for (int64_t nt = begin; nt < end; ++nt) {
      const int64_t n = nt / g.T, t = nt % g.T;
      std::copy(x + nt * Hp * Wp, x + (nt + 1) * Hp * Wp, image.begin());
      const double* xs = image.data();
      for (int64_t c0 = 0; c0 < g.C; c0 += 16) {
        __m512d w0[9], w1[9];
        for (int d = 0; d < 9; ++d) {
          w0[d] = _mm512_loadu_pd(w + (t * 9 + d) * g.C + c0);
          w1[d] = _mm512_loadu_pd(w + (t * 9 + d) * g.C + c0 + 8);
        }
        const __m512d b0 = _mm512_loadu_pd(b + t * g.C + c0), b1 = _mm512_loadu_pd(b + t * g.C + c0 + 8);
        for (int64_t i = 0; i < g.Ho; ++i) {
          for (int64_t j = 0; j < g.Wo; ++j) {
            const double* r = xs + 2 * i * Wp + 2 * j;
            __m512d a0[4], a1[4];
            for (int k = 0; k < 4; ++k) a0[k] = a1[k] = _mm512_setzero_pd();
            for (int ky = 0; ky < 3; ++ky)
              for (int kx = 0; kx < 3; ++kx) {
                const int d = ky * 3 + kx;
                for (int k = 0; k < 4; ++k) {
                  const __m512d v = _mm512_set1_pd(r[((k >> 1) + ky) * Wp + (k & 1) + kx]);
                  a0[k] = _mm512_fmadd_pd(v, w0[d], a0[k]);
                  a1[k] = _mm512_fmadd_pd(v, w1[d], a1[k]);
                }
              }
            const int64_t o = (((n * g.Ho + i) * g.Wo + j) * g.T + t) * g.C + c0;
            for (int h = 0; h < 2; ++h) {
              const __m512d* a = h == 0 ? a0 : a1;
              __m512d best = a[0];
              __m512i win = _mm512_setzero_si512();
              for (int k = 1; k < 4; ++k) {
                const __mmask8 m = _mm512_cmp_pd_mask(a[k], best, _CMP_GT_OQ);
                best = _mm512_mask_mov_pd(best, m, a[k]);
                win = _mm512_mask_mov_epi64(win, m, _mm512_set1_epi64(k));
              }
              const __m512d y = _mm512_max_pd(_mm512_add_pd(best, h == 0 ? b0 : b1), _mm512_setzero_pd());
              _mm256_storeu_ps(out + o + 8 * h, _mm512_cvtpd_ps(y));
              _mm_storel_epi64(reinterpret_cast<__m128i*>(idx + o + 8 * h), _mm512_cvtepi64_epi8(win));
            }
          }
        }
      }
    }
  });
}

// masked_forward_impl for the same layer: each output takes the window value at the stored winner.
void masked_forward_grey3x3(const float* x, const float* vw, const float* vb, const float* out, const uint8_t* idx,
                            float* res, const Geometry& g) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  at::parallel_for(0, g.N * g.T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt) {
      const int64_t n = nt / g.T, t = nt % g.T;
      const float* xs = x + nt * Hp * Wp;
      for (int64_t c0 = 0; c0 < g.C; c0 += 32) {
        __m512 w0[9], w1[9];
        for (int d = 0; d < 9; ++d) {
          w0[d] = _mm512_loadu_ps(vw + (t * 9 + d) * g.C + c0);
          w1[d] = _mm512_loadu_ps(vw + (t * 9 + d) * g.C + c0 + 16);
        }
        const __m512 b0 = _mm512_loadu_ps(vb + t * g.C + c0), b1 = _mm512_loadu_ps(vb + t * g.C + c0 + 16);
        for (int64_t i = 0; i < g.Ho; ++i) {
          for (int64_t j = 0; j < g.Wo; ++j) {
            const int64_t o = (((n * g.Ho + i) * g.Wo + j) * g.T + t) * g.C + c0;
            const float* r = xs + 2 * i * Wp + 2 * j;
            const __m512i k0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + o)));
            const __m512i k1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + o + 16)));
            __m512 a0 = b0, a1 = b1;
            for (int k = 0; k < 4; ++k) {
              const __m512i kk = _mm512_set1_epi32(k);
              const __mmask16 m0 = _mm512_cmpeq_epi32_mask(k0, kk), m1 = _mm512_cmpeq_epi32_mask(k1, kk);
              for (int ky = 0; ky < 3; ++ky)
                for (int kx = 0; kx < 3; ++kx) {
                  const __m512 v = _mm512_set1_ps(r[((k >> 1) + ky) * Wp + (k & 1) + kx]);
                  a0 = _mm512_mask3_fmadd_ps(v, w0[ky * 3 + kx], a0, m0);
                  a1 = _mm512_mask3_fmadd_ps(v, w1[ky * 3 + kx], a1, m1);
                }
            }
            const __m512 z = _mm512_setzero_ps();
            _mm512_storeu_ps(res + o, _mm512_maskz_mov_ps(
                _mm512_cmp_ps_mask(_mm512_loadu_ps(out + o), z, _CMP_GT_OQ), a0));
            _mm512_storeu_ps(res + o + 16, _mm512_maskz_mov_ps(
                _mm512_cmp_ps_mask(_mm512_loadu_ps(out + o + 16), z, _CMP_GT_OQ), a1));
          }
        }
      }
    }
  });
}

// acc[0..16) += the 16 floats of s, in double precision.
inline void add_wide(double* acc, __m512 s) {
  const __m256 lo = _mm512_castps512_ps256(s);
  const __m256 hi = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(s), 1));
  _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_cvtps_pd(lo)));
  _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), _mm512_cvtps_pd(hi)));
}

// Adds images [n0, n1)'s contributions for task t and channels [c0, c0 + 32) to acc [D + 1, C].
// Each row of pooled outputs is summed in registers (float32, at most Wo positions) and then added
// to acc in double precision: see accumulate_image for why the long sums must not run in float32.
void accumulate_grey3x3(const float* gout, const float* x, const float* out, const uint8_t* idx, double* acc,
                        const Geometry& g, int64_t n0, int64_t n1, int64_t t, int64_t c0) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  __m512 s0[9], s1[9];
  __m512 sb0, sb1;
  for (int64_t n = n0; n < n1; ++n) {
    const float* xs = x + (n * g.T + t) * Hp * Wp;
    for (int64_t i = 0; i < g.Ho; ++i) {
      for (int d = 0; d < 9; ++d) s0[d] = s1[d] = _mm512_setzero_ps();
      sb0 = sb1 = _mm512_setzero_ps();
      for (int64_t j = 0; j < g.Wo; ++j) {
        const int64_t o = (((n * g.Ho + i) * g.Wo + j) * g.T + t) * g.C + c0;
        // Through the ReLU (where its output is positive), then to the window position that won.
        const __m512 z = _mm512_setzero_ps();
        const __m512 v0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(out + o), z, _CMP_GT_OQ),
                                              _mm512_loadu_ps(gout + o));
        const __m512 v1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(out + o + 16), z, _CMP_GT_OQ),
                                              _mm512_loadu_ps(gout + o + 16));
        sb0 = _mm512_add_ps(sb0, v0);
        sb1 = _mm512_add_ps(sb1, v1);
        const __m512i k0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + o)));
        const __m512i k1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + o + 16)));
        const float* r = xs + 2 * i * Wp + 2 * j;
        for (int k = 0; k < 4; ++k) {
          const __m512i kk = _mm512_set1_epi32(k);
          const __m512 g0 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k0, kk), v0);
          const __m512 g1 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k1, kk), v1);
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              const __m512 p = _mm512_set1_ps(r[((k >> 1) + ky) * Wp + (k & 1) + kx]);
              s0[ky * 3 + kx] = _mm512_fmadd_ps(p, g0, s0[ky * 3 + kx]);
              s1[ky * 3 + kx] = _mm512_fmadd_ps(p, g1, s1[ky * 3 + kx]);
            }
        }
      }
      for (int d = 0; d < 9; ++d) {
        add_wide(acc + d * g.C + c0, s0[d]);
        add_wide(acc + d * g.C + c0 + 16, s1[d]);
      }
      add_wide(acc + 9 * g.C + c0, sb0);
      add_wide(acc + 9 * g.C + c0 + 16, sb1);
    }
  }
}

// backward_impl's blocks (the same fixed split of the images, summed in block order), with the
// kernel gradient of each block and 32-channel slice accumulated in registers.
void backward_grey3x3(const float* gout, const float* x, const float* out, const uint8_t* idx, float* gw, float* gb,
                      const Geometry& g) {
  const int64_t rows = g.D + 1, per = g.T * rows * g.C;
  const int64_t blocks = std::min<int64_t>(g.N, 16), size = (g.N + blocks - 1) / blocks;
  std::vector<double> partial(blocks * per, 0.0);
  const int64_t slices = g.C / 32;
  at::parallel_for(0, blocks * g.T * slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t job = first; job < last; ++job) {
      const int64_t blk = job / (g.T * slices), t = job / slices % g.T, c0 = job % slices * 32;
      accumulate_grey3x3(gout, x, out, idx, partial.data() + blk * per + t * rows * g.C, g, blk * size,
                         std::min(g.N, (blk + 1) * size), t, c0);
    }
  });
  reduce_blocks(partial, blocks, gw, gb, g);
}
#endif

Geometry geometry(const at::Tensor& x, const at::Tensor& w, int64_t kh, int64_t kw, int64_t pad) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous(), "x must be a contiguous [N, T, Cin, H, W] tensor");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "w must be a contiguous [T, D, C] tensor");
  // x arrives zero-padded by `pad` on every side; H and W are the unpadded sizes.
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3) - 2 * pad, x.size(4) - 2 * pad, w.size(2), kh, kw, pad,
             0, 0, 0};
  g.D = g.Cin * kh * kw;
  TORCH_CHECK(w.size(0) == g.T && w.size(1) == g.D, "w must be [T, Cin * KH * KW, C]");
  g.Ho = (g.H + 2 * pad - kh + 1) / 2;
  g.Wo = (g.W + 2 * pad - kw + 1) / 2;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "the pooled output would be empty");
  return g;
}

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t kh,
                                int64_t kw, int64_t pad) {
  const Geometry g = geometry(x, w, kh, kw, pad);
  TORCH_CHECK(b.is_contiguous() && b.numel() == g.T * g.C, "b must be a contiguous [T, C] tensor");
  TORCH_CHECK(b.scalar_type() == w.scalar_type(), "the kernel and the bias must have one dtype");
  auto out = at::empty({g.N, g.Ho, g.Wo, g.T, g.C}, x.options());
  auto idx = at::empty({g.N, g.Ho, g.Wo, g.T, g.C}, x.options().dtype(at::kByte));
  if (w.scalar_type() != x.scalar_type()) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kDouble,
                "a wide pass takes float images with a double kernel and bias");
#if defined(__AVX512F__)
    if (grey3x3(g)) {
      forward_grey3x3_wide(x.data_ptr<float>(), w.data_ptr<double>(), b.data_ptr<double>(), out.data_ptr<float>(),
                           idx.data_ptr<uint8_t>(), g);
      return {out, idx};
    }
#endif
    forward_impl<float, double>(x.data_ptr<float>(), w.data_ptr<double>(), b.data_ptr<double>(),
                                out.data_ptr<float>(), idx.data_ptr<uint8_t>(), g);
    return {out, idx};
  }
#if defined(__AVX512F__)
  if (x.scalar_type() == at::kFloat && grey3x3(g)) {
    forward_grey3x3(x.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(),
                    idx.data_ptr<uint8_t>(), g);
    return {out, idx};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_pool_relu_forward", [&] {
    forward_impl<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(), g);
  });
  return {out, idx};
}

std::vector<at::Tensor> backward(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& out, const at::Tensor& idx, int64_t kh, int64_t kw,
                                 int64_t pad) {
  const Geometry g = geometry(x, w, kh, kw, pad);
  TORCH_CHECK(gout.is_contiguous() && out.is_contiguous() && idx.is_contiguous(),
              "gradient, output and indices must be contiguous");
  auto gw = at::zeros({g.T, g.D, g.C}, x.options());
  auto gb = at::zeros({g.T, g.C}, x.options());
#if defined(__AVX512F__)
  if (x.scalar_type() == at::kFloat && grey3x3(g)) {
    backward_grey3x3(gout.data_ptr<float>(), x.data_ptr<float>(), out.data_ptr<float>(), idx.data_ptr<uint8_t>(),
                     gw.data_ptr<float>(), gb.data_ptr<float>(), g);
    return {gw, gb};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_pool_relu_backward", [&] {
    backward_impl<scalar_t>(gout.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            idx.data_ptr<uint8_t>(), gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), g);
  });
  return {gw, gb};
}

at::Tensor masked_forward(const at::Tensor& x, const at::Tensor& vw, const at::Tensor& vb, const at::Tensor& out,
                          const at::Tensor& idx, int64_t kh, int64_t kw, int64_t pad) {
  const Geometry g = geometry(x, vw, kh, kw, pad);
  TORCH_CHECK(vb.is_contiguous() && vb.numel() == g.T * g.C, "vb must be a contiguous [T, C] tensor");
  TORCH_CHECK(out.is_contiguous() && idx.is_contiguous(), "output and indices must be contiguous");
  auto res = at::empty_like(out);
#if defined(__AVX512F__)
  if (x.scalar_type() == at::kFloat && grey3x3(g)) {
    masked_forward_grey3x3(x.data_ptr<float>(), vw.data_ptr<float>(), vb.data_ptr<float>(), out.data_ptr<float>(),
                           idx.data_ptr<uint8_t>(), res.data_ptr<float>(), g);
    return res;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_pool_relu_masked_forward", [&] {
    masked_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), vw.data_ptr<scalar_t>(), vb.data_ptr<scalar_t>(),
                                  out.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(), res.data_ptr<scalar_t>(), g);
  });
  return res;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "per-task conv + bias + 2x2 max-pool + ReLU: (out, argmax)");
  m.def("backward", &backward, "gradients of the kernel [T, D, C] and bias [T, C]");
  m.def("masked_forward", &masked_forward, "derivative of backward() w.r.t. the incoming gradient");
}
