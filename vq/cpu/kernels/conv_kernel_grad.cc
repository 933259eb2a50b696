// Kernel gradient of a 2-D convolution (NHWC input, HWIO kernel) for XLA:CPU, as an XLA FFI
// custom call. Built and loaded by vq/native.py; used by vq/conv.py on CPU only.
//
//   dw[i, j, c, o] = sum_{n, y, x} x[n, y*sh + i - pt, x*sw + j - pl, c] * dy[n, y, x, o]
//
// with zeros outside x (the convolution's padding, never materialised). Why: XLA:CPU has
// no fast kernel gradient; im2col + matmul spends about 40% of its time building the
// im2col blocks. This loop reads x and dy in place: for each pair of output rows and each
// tap it sweeps the pixels once per tile of 4 input channels x 64 output channels, with
// the 16 accumulators in AVX-512 registers, so both rows of dy and the 3-4 rows of x they
// need stay in L1. Sums run in float32, in pixel order.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 2;  // Output rows per sweep (measured: 1, 2, 4 -> 2 fastest).

struct Geometry {
  int64_t n, h, w, ci;   // x
  int64_t oh, ow, co;    // dy
  int64_t kh, kw;        // taps
  int64_t sh, sw, pt, pl;
};

// acc[r][v] += x[pixel, c0 + r] * dy[pixel, o0 + 16 v : o0 + 16 v + 16], over `rows` rows
// of `count` pixels each. dw points at dw[i, j, c0, o0].
template <int CT, int NV>
__attribute__((target("avx512f"))) void Tile(const float* dy, const float* x, float* dw,
                                             int64_t rows, int64_t count, int64_t co,
                                             int64_t dy_row, int64_t x_row, int64_t x_step) {
  __m512 acc[CT][NV];
  for (int r = 0; r < CT; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(dw + r * co + 16 * v);
  for (int64_t q = 0; q < rows; ++q) {
    const float* d = dy + q * dy_row;
    const float* s = x + q * x_row;
    for (int64_t p = 0; p < count; ++p, d += co, s += x_step) {
      __m512 dv[NV];
      for (int v = 0; v < NV; ++v) dv[v] = _mm512_loadu_ps(d + 16 * v);
      for (int r = 0; r < CT; ++r) {
        const __m512 b = _mm512_set1_ps(s[r]);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(b, dv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < CT; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(dw + r * co + 16 * v, acc[r][v]);
}

template <int CT>
__attribute__((target("avx512f"))) void TileCo(const float* dy, const float* x, float* dw,
                                               int64_t rows, int64_t count, int64_t co,
                                               int64_t dy_row, int64_t x_row,
                                               int64_t x_step) {
  for (int64_t o0 = 0; o0 < co; o0 += 64) {
    const float* d = dy + o0;
    float* t = dw + o0;
    switch (std::min<int64_t>(4, (co - o0) / 16)) {
      case 4: Tile<CT, 4>(d, x, t, rows, count, co, dy_row, x_row, x_step); break;
      case 3: Tile<CT, 3>(d, x, t, rows, count, co, dy_row, x_row, x_step); break;
      case 2: Tile<CT, 2>(d, x, t, rows, count, co, dy_row, x_row, x_step); break;
      default: Tile<CT, 1>(d, x, t, rows, count, co, dy_row, x_row, x_step); break;
    }
  }
}

// First output index o in [0, n) with lo <= o * s + k - p (k - p + o * s >= 0), and one past
// the last with o * s + k - p < size: the outputs whose tap k reads inside [0, size).
void ValidRange(int64_t n, int64_t s, int64_t k, int64_t p, int64_t size, int64_t* begin,
                int64_t* end) {
  const int64_t off = k - p;
  int64_t b = off >= 0 ? 0 : (-off + s - 1) / s;
  int64_t e = off >= size ? 0 : (size - 1 - off) / s + 1;
  *begin = std::min(b, n);
  *end = std::max(*begin, std::min(e, n));
}

__attribute__((target("avx512f"))) void KernelGrad(const Geometry& g, const float* x,
                                                   const float* dy, float* dw) {
  std::memset(dw, 0, sizeof(float) * g.kh * g.kw * g.ci * g.co);
  const int64_t x_step = g.sw * g.ci;
  for (int64_t b = 0; b < g.n; ++b) {
    for (int64_t y0 = 0; y0 < g.oh; y0 += kRows) {
      const int64_t y1 = std::min(g.oh, y0 + kRows);
      for (int64_t i = 0; i < g.kh; ++i) {
        int64_t ya, yb;  // Output rows of this band whose input row is inside x.
        ValidRange(g.oh, g.sh, i, g.pt, g.h, &ya, &yb);
        ya = std::max(ya, y0);
        yb = std::min(yb, y1);
        if (ya >= yb) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          int64_t xa, xb;
          ValidRange(g.ow, g.sw, j, g.pl, g.w, &xa, &xb);
          if (xa >= xb) continue;
          const float* d = dy + ((b * g.oh + ya) * g.ow + xa) * g.co;
          const float* s =
              x + ((b * g.h + ya * g.sh + i - g.pt) * g.w + xa * g.sw + j - g.pl) * g.ci;
          float* t = dw + (i * g.kw + j) * g.ci * g.co;
          const int64_t rows = yb - ya, count = xb - xa;
          const int64_t dy_row = g.ow * g.co, x_row = g.sh * g.w * g.ci;
          int64_t c0 = 0;
          for (; c0 + 4 <= g.ci; c0 += 4)
            TileCo<4>(d, s + c0, t + c0 * g.co, rows, count, g.co, dy_row, x_row, x_step);
          switch (g.ci - c0) {
            case 3: TileCo<3>(d, s + c0, t + c0 * g.co, rows, count, g.co, dy_row, x_row, x_step); break;
            case 2: TileCo<2>(d, s + c0, t + c0 * g.co, rows, count, g.co, dy_row, x_row, x_step); break;
            case 1: TileCo<1>(d, s + c0, t + c0 * g.co, rows, count, g.co, dy_row, x_row, x_step); break;
            default: break;
          }
        }
      }
    }
  }
}

ffi::Error ConvKernelGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                              int64_t pt, int64_t pl) {
  const auto xd = x.dimensions(), dyd = dy.dimensions(), dwd = dw->dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || dwd.size() != 4 || xd[0] != dyd[0] ||
      dwd[2] != xd[3] || dwd[3] != dyd[3] || dyd[3] % 16 != 0 || sh < 1 || sw < 1) {
    return ffi::Error::InvalidArgument(
        "vq_conv_kernel_grad: expects x [N,H,W,C], dy [N,OH,OW,O], dw [KH,KW,C,O] with O a "
        "multiple of 16 and positive strides");
  }
  const Geometry g{xd[0], xd[1], xd[2], xd[3], dyd[1], dyd[2], dyd[3],
                   dwd[0], dwd[1], sh, sw, pt, pl};
  KernelGrad(g, x.typed_data(), dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqConvKernelGrad, ConvKernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

// 1 where this CPU runs the AVX-512 code above, else 0 (vq/native.py then keeps XLA's path).
extern "C" int vq_native_supported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }
