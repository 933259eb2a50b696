// GroupNorm (optionally followed by swish) and its gradient for XLA:CPU, as XLA FFI custom
// calls. Built with conv_kernel_grad.cc by vq/native.py; used by vq/norms.py on CPU only.
//
// x is [N, S, C] (S: all spatial positions), statistics per example and group of C / G
// channels, with the two-pass variance of vq/norms.py:
//   mean = sum(x) / (S Cg),  var = sum((x - mean)^2) / (S Cg),  r = 1 / sqrt(var + eps)
//   h = (x - mean) r scale + bias,  y = h or swish(h) = h sigmoid(h)
// Forward: two reading passes for the statistics, one for y. Gradient: one reading pass
// for the per-channel sums of dh and dh x (dh: the cotangent of h, swish's derivative
// recomputed from x), one for dx = dh A + x B + C with per-channel A, B, C. Sums over
// pixels accumulate in double. XLA:CPU spent 2-3x that memory traffic on the same
// function (vq/norms.py's group_norm + swish, value and gradient).

#include <cmath>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Everything up to the FFI glue is compiled for AVX-512 (lambdas included); it only runs
// where vq_native_supported() said so.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f")
#endif
#define VQ_AVX512

// exp(x) for float32 lanes: 2^n exp(r) with |r| <= ln(2)/2 and Cephes' expf polynomial
// (about 1 ulp); arguments are clamped to [-87.3, 88.3].
VQ_AVX512 inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

VQ_AVX512 inline __m512 Sigmoid(__m512 h) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, Exp(_mm512_sub_ps(_mm512_setzero_ps(), h))));
}

// acc[c] += v[c] for 16 channels, in double.
VQ_AVX512 inline void AddToDouble(double* acc, __m512 v) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), lo));
  _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), hi));
}

struct Shape {
  int64_t n, s, c, groups;
};

// Per-channel sums over the S pixels of one example: sum(f(x)) for f given per vector.
template <typename F>
VQ_AVX512 void ChannelSums(const float* x, int64_t s, int64_t c, double* out, F f) {
  constexpr int64_t kChunk = 32;  // float32 partial sums over at most 32 pixels
  std::vector<float> part(c);
  for (int64_t k = 0; k < c; ++k) out[k] = 0.0;
  for (int64_t p0 = 0; p0 < s; p0 += kChunk) {
    const int64_t p1 = std::min(s, p0 + kChunk);
    for (int64_t v = 0; v < c; v += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t p = p0; p < p1; ++p) acc = _mm512_add_ps(acc, f(p, v, _mm512_loadu_ps(x + p * c + v)));
      AddToDouble(out + v, acc);
    }
  }
}

VQ_AVX512 void Forward(const Shape& g, const float* x, const float* scale, const float* bias,
                       float eps, bool swish, float* y, float* mean_out, float* rstd_out) {
  const int64_t cg = g.c / g.groups;
  const double count = static_cast<double>(g.s) * cg;
  std::vector<double> sums(g.c);
  std::vector<float> mean_c(g.c), a(g.c), b(g.c);
  for (int64_t n = 0; n < g.n; ++n) {
    const float* xn = x + n * g.s * g.c;
    ChannelSums(xn, g.s, g.c, sums.data(), [](int64_t, int64_t, __m512 v) { return v; });
    for (int64_t k = 0; k < g.groups; ++k) {
      double m = 0;
      for (int64_t j = 0; j < cg; ++j) m += sums[k * cg + j];
      mean_out[n * g.groups + k] = static_cast<float>(m / count);
      for (int64_t j = 0; j < cg; ++j) mean_c[k * cg + j] = mean_out[n * g.groups + k];
    }
    ChannelSums(xn, g.s, g.c, sums.data(), [&](int64_t, int64_t v, __m512 xv) {
      const __m512 d = _mm512_sub_ps(xv, _mm512_loadu_ps(mean_c.data() + v));
      return _mm512_mul_ps(d, d);
    });
    for (int64_t k = 0; k < g.groups; ++k) {
      double var = 0;
      for (int64_t j = 0; j < cg; ++j) var += sums[k * cg + j];
      const float r = 1.0f / std::sqrt(static_cast<float>(var / count) + eps);
      rstd_out[n * g.groups + k] = r;
      for (int64_t j = 0; j < cg; ++j) {
        const int64_t ch = k * cg + j;
        a[ch] = r * scale[ch];
        b[ch] = bias[ch] - mean_c[ch] * a[ch];
      }
    }
    float* yn = y + n * g.s * g.c;
    for (int64_t p = 0; p < g.s; ++p) {
      for (int64_t v = 0; v < g.c; v += 16) {
        __m512 h = _mm512_fmadd_ps(_mm512_loadu_ps(xn + p * g.c + v), _mm512_loadu_ps(a.data() + v),
                                   _mm512_loadu_ps(b.data() + v));
        if (swish) h = _mm512_mul_ps(h, Sigmoid(h));
        _mm512_storeu_ps(yn + p * g.c + v, h);
      }
    }
  }
}

VQ_AVX512 void Backward(const Shape& g, const float* x, const float* scale, const float* bias,
                        const float* mean, const float* rstd, const float* dy, bool swish,
                        float* dx, float* dscale, float* dbias) {
  const int64_t cg = g.c / g.groups;
  const double count = static_cast<double>(g.s) * cg;
  std::vector<double> t1(g.c), t2(g.c), ds(g.c, 0.0), db(g.c, 0.0);
  std::vector<float> a(g.c), b(g.c), A(g.c), B(g.c), C(g.c);
  for (int64_t n = 0; n < g.n; ++n) {
    const float* xn = x + n * g.s * g.c;
    const float* dyn = dy + n * g.s * g.c;
    for (int64_t ch = 0; ch < g.c; ++ch) {
      const float r = rstd[n * g.groups + ch / cg], m = mean[n * g.groups + ch / cg];
      a[ch] = r * scale[ch];
      b[ch] = bias[ch] - m * a[ch];
    }
    // dh = dy * swish'(h), h = x a + b; swish'(h) = s (1 + h (1 - s)), s = sigmoid(h).
    auto dh = [&](int64_t p, int64_t v, __m512 xv) {
      const __m512 d = _mm512_loadu_ps(dyn + p * g.c + v);
      if (!swish) return d;
      const __m512 h = _mm512_fmadd_ps(xv, _mm512_loadu_ps(a.data() + v), _mm512_loadu_ps(b.data() + v));
      const __m512 s = Sigmoid(h);
      const __m512 one = _mm512_set1_ps(1.0f);
      return _mm512_mul_ps(d, _mm512_mul_ps(s, _mm512_fmadd_ps(h, _mm512_sub_ps(one, s), one)));
    };
    ChannelSums(xn, g.s, g.c, t1.data(), dh);
    ChannelSums(xn, g.s, g.c, t2.data(), [&](int64_t p, int64_t v, __m512 xv) {
      return _mm512_mul_ps(dh(p, v, xv), xv);
    });
    for (int64_t k = 0; k < g.groups; ++k) {
      const double r = rstd[n * g.groups + k], m = mean[n * g.groups + k];
      double m1 = 0, m2 = 0;  // group means of dxhat and of dxhat * xhat
      for (int64_t j = 0; j < cg; ++j) {
        const int64_t ch = k * cg + j;
        const double centred = t2[ch] - m * t1[ch];  // sum dh (x - mean)
        db[ch] += t1[ch];
        ds[ch] += r * centred;
        m1 += scale[ch] * t1[ch];
        m2 += scale[ch] * r * centred;
      }
      m1 /= count;
      m2 /= count;
      for (int64_t j = 0; j < cg; ++j) {
        const int64_t ch = k * cg + j;
        A[ch] = static_cast<float>(r * scale[ch]);
        B[ch] = static_cast<float>(-r * r * m2);
        C[ch] = static_cast<float>(-r * m1 + m * r * r * m2);
      }
    }
    float* dxn = dx + n * g.s * g.c;
    for (int64_t p = 0; p < g.s; ++p) {
      for (int64_t v = 0; v < g.c; v += 16) {
        const __m512 xv = _mm512_loadu_ps(xn + p * g.c + v);
        __m512 out = _mm512_fmadd_ps(xv, _mm512_loadu_ps(B.data() + v), _mm512_loadu_ps(C.data() + v));
        out = _mm512_fmadd_ps(dh(p, v, xv), _mm512_loadu_ps(A.data() + v), out);
        _mm512_storeu_ps(dxn + p * g.c + v, out);
      }
    }
  }
  for (int64_t ch = 0; ch < g.c; ++ch) {
    dscale[ch] = static_cast<float>(ds[ch]);
    dbias[ch] = static_cast<float>(db[ch]);
  }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool ValidShape(const ffi::Buffer<ffi::F32>& x, int64_t groups, Shape* g) {
  const auto d = x.dimensions();
  if (d.size() != 3 || groups < 1 || d[2] % 16 != 0 || d[2] % groups != 0) return false;
  *g = Shape{d[0], d[1], d[2], groups};
  return true;
}

ffi::Error GroupNormFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                            int64_t groups, float eps, int64_t swish) {
  Shape g;
  if (!ValidShape(x, groups, &g)) {
    return ffi::Error::InvalidArgument(
        "vq_group_norm_fwd: expects x [N, S, C] with C a multiple of 16 and of groups");
  }
  Forward(g, x.typed_data(), scale.typed_data(), bias.typed_data(), eps, swish != 0,
          y->typed_data(), mean->typed_data(), rstd->typed_data());
  return ffi::Error::Success();
}

ffi::Error GroupNormBwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                            ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                            ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                            ffi::ResultBuffer<ffi::F32> dbias, int64_t groups, int64_t swish) {
  Shape g;
  if (!ValidShape(x, groups, &g)) {
    return ffi::Error::InvalidArgument(
        "vq_group_norm_bwd: expects x [N, S, C] with C a multiple of 16 and of groups");
  }
  Backward(g, x.typed_data(), scale.typed_data(), bias.typed_data(), mean.typed_data(),
           rstd.typed_data(), dy.typed_data(), swish != 0, dx->typed_data(),
           dscale->typed_data(), dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqGroupNormFwd, GroupNormFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("swish"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqGroupNormBwd, GroupNormBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("swish"));
