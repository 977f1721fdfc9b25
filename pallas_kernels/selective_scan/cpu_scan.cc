// Selective scan on CPU, forward and backward, as XLA FFI handlers.
//
// Everything of mamba_jax.ops.selective_scan between the float32 casts, per
// channel c, state index k and step t:
//
//   dt_t = softplus(delta_t + bias)   (or delta_t + bias without softplus)
//   h_t  = keep_t * exp(dt_t A) h_{t-1} + dt_t u_t B_t
//   y_t  = (sum_k C_t[k] h_t[k] + D u_t) * silu(z_t)   (no gate without z)
//
// so that the bias, softplus, skip and gate, forward and backward, are part of
// the kernel's passes over (b, l, d) instead of separate XLA passes.
//
// Layouts (row-major, as XLA passes them): u, delta, z, y, du, ddelta, dz
// (b, l, d); bias, D (d); A (d, n); B, C, dB, dC (b, l, g, n); keep (b, l);
// h0, hT, dh0 (b, d, n); starts (b, nc, d, n), the state before each chunk of
// `chunk` steps (nc = ceil(l / chunk)); channel c uses group c / (d / g). A
// missing gate is a z of size 0 (and dz of size 0).
//
// Work is split into items (batch row, group, block of up to kBlock channels);
// the split does not depend on the number of threads, and every output element
// is written by exactly one item, so the results are the same bits whatever the
// thread count. Reductions over channels (dB, dC) are written per channel block
// and then summed over blocks in a fixed order by a second pass of the handler;
// reductions over batch rows (dA, dD, dbias) are written per row (b, ...) and
// summed in XLA.
//
// Inside an item the state is held as (n, channels), channels innermost, so the
// loops over channels are contiguous and vectorise (-O3, -fopenmp-simd for the
// reductions over channels); the backward recomputes one chunk's states from its
// boundary state (and each step's decay) into (chunk + 1, n, channels) buffers
// that stay in cache, then runs one reverse loop that computes every gradient
// of a step together.
//
// Threads: the handlers take XLA:CPU's own intra-op thread pool through the FFI
// context (ffi::ThreadPool, in the headers of every jaxlib we support) rather
// than starting std::threads, so they share XLA's threads instead of
// oversubscribing the cores. The calling thread also takes items from the same
// atomic counter and never waits for a task that has not started: a pool that is
// busy (or absent, when Schedule runs the task inline) cannot deadlock the call.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // channels per work item

// exp(x) for float32 by range reduction and a degree-6 polynomial (Cephes
// expf), written without branches or library calls so that loops over channels
// vectorise; relative error ~2 ulp. Inputs below -87 give ~1e-38 instead of 0.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f;
  x = x - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  float y = p * x * x + x + 1.0f;
  int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return y * scale;
}

// log(1 + y) for y in [0, 1], branch-free (Cephes logf's polynomial on [sqrt(1/2),
// sqrt(2)) with the rounding of 1 + y corrected), so that loops over channels
// vectorise; relative error ~2 ulp.
inline float log1p_unit(float y) {
  const float w = 1.0f + y;
  const float corr = (y - (w - 1.0f)) / w;  // what the rounding of 1 + y lost
  const bool hi = w > 1.41421356f;
  const float x = hi ? w * 0.5f - 1.0f : w - 1.0f;  // exact: w in [1, 2]
  const float e = hi ? 1.0f : 0.0f;
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float r = p * x * z - 2.12194440e-4f * e - 0.5f * z;
  return x + r + 0.693359375f * e + corr;
}

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)), as jax.nn.softplus.
inline float softplus(float x) { return std::max(x, 0.0f) + log1p_unit(fast_exp(-std::fabs(x))); }

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

struct Dims {
  int64_t b, l, d, g, n, p, jb, chunk, nc;
};

Dims dims_of(const ffi::Buffer<ffi::F32>& u, const ffi::Buffer<ffi::F32>& B, int64_t chunk) {
  auto ud = u.dimensions();
  auto bd = B.dimensions();
  Dims s;
  s.b = ud[0];
  s.l = ud[1];
  s.d = ud[2];
  s.g = bd[2];
  s.n = bd[3];
  s.p = s.d / s.g;
  s.jb = (s.p + kBlock - 1) / kBlock;
  s.chunk = chunk;
  s.nc = (s.l + chunk - 1) / chunk;
  return s;
}

// Runs body(item) for item in [0, count) on the calling thread and the pool.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t count, Body body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  // `body` lives on this frame: a task only calls it for an item it claimed, and
  // every claimed item is finished before this function returns.
  auto work = [shared, count, &body]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < count;) {
      body(i);
      if (shared->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = work;  // a copy holding the shared state: a task that starts after the call
    pool.Schedule(std::move(task));  // returned finds no item left and touches nothing else
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == count; });
}


// The kernel's inputs other than the state: see the layouts at the top.
struct Inputs {
  const float *u, *delta, *bias, *A, *B, *C, *D, *z, *keep;
  bool softplus;  // dt = softplus(delta + bias), else delta + bias
  bool gate;      // z given: y *= silu(z)
};

// The first channel of an item and its number of channels (a last, partial
// block has fewer than kBlock; the lanes past P run as padding: dt = u = 0, state
// and adjoint 0, never stored, so they add nothing to the sums over channels).
struct Item {
  int64_t j, gi, bi, c0, P;
};

Item item_of(const Dims& s, int64_t item) {
  Item it;
  it.j = item % s.jb;
  it.gi = (item / s.jb) % s.g;
  it.bi = item / (s.jb * s.g);
  it.c0 = it.gi * s.p + it.j * kBlock;
  it.P = std::min(kBlock, s.p - it.j * kBlock);
  return it;
}

// dt of one step for channels [0, P) of a row: dt[c] = softplus(delta[c] + bias[c]).
inline void step_dt(const Inputs& in, const float* delta, const float* bias, int64_t P, float* dt) {
  if (in.softplus) {
#pragma omp simd
    for (int64_t c = 0; c < P; ++c) dt[c] = softplus(delta[c] + bias[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < P; ++c) dt[c] = delta[c] + bias[c];
  }
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

void forward_item(const Dims& s, const Inputs& in, int64_t item, const float* h0, float* y, float* hT,
                  float* starts) {
  constexpr int64_t K = kBlock;
  const int64_t n = s.n, d = s.d;
  const Item it = item_of(s, item);
  const int64_t bi = it.bi, gi = it.gi, c0 = it.c0, P = it.P;
  std::vector<float> At_v(n * K, 0.0f), h_v(n * K, 0.0f);
  float* __restrict At = At_v.data();
  float* __restrict h = h_v.data();
  alignas(64) float dtv[K] = {}, dtu[K] = {}, yt[K];
  for (int64_t k = 0; k < n; ++k)
    for (int64_t c = 0; c < P; ++c) {
      At[k * K + c] = in.A[(c0 + c) * n + k];
      h[k * K + c] = h0[(bi * d + c0 + c) * n + k];
    }
  const float* bias = in.bias + c0;
  const float* D = in.D + c0;
  for (int64_t t = 0; t < s.l; ++t) {
    if (t % s.chunk == 0) {
      float* st = starts + ((bi * s.nc + t / s.chunk) * d + c0) * n;
      for (int64_t c = 0; c < P; ++c)
        for (int64_t k = 0; k < n; ++k) st[c * n + k] = h[k * K + c];
    }
    const int64_t row = (bi * s.l + t) * d + c0;
    const float* B_t = in.B + ((bi * s.l + t) * s.g + gi) * n;
    const float* C_t = in.C + ((bi * s.l + t) * s.g + gi) * n;
    const float keep_t = in.keep[bi * s.l + t];
    const float* u = in.u + row;
    step_dt(in, in.delta + row, bias, P, dtv);
#pragma omp simd
    for (int64_t c = 0; c < P; ++c) dtu[c] = dtv[c] * u[c];
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) yt[c] = 0.0f;
    for (int64_t k = 0; k < n; ++k) {
      float* __restrict hk = h + k * K;
      const float* __restrict Ak = At + k * K;
      const float Bk = B_t[k], Ck = C_t[k];
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) {
        float a = fast_exp(dtv[c] * Ak[c]) * keep_t;
        float hn = a * hk[c] + Bk * dtu[c];
        hk[c] = hn;
        yt[c] += Ck * hn;
      }
    }
    float* yo = y + row;
    if (in.gate) {
      const float* z = in.z + row;
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) yo[c] = (yt[c] + D[c] * u[c]) * (z[c] * sigmoid(z[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) yo[c] = yt[c] + D[c] * u[c];
    }
  }
  for (int64_t c = 0; c < P; ++c)
    for (int64_t k = 0; k < n; ++k) hT[(bi * d + c0 + c) * n + k] = h[k * K + c];
}

Inputs inputs_of(ffi::Buffer<ffi::F32>& u, ffi::Buffer<ffi::F32>& delta, ffi::Buffer<ffi::F32>& bias,
                 ffi::Buffer<ffi::F32>& A, ffi::Buffer<ffi::F32>& B, ffi::Buffer<ffi::F32>& C,
                 ffi::Buffer<ffi::F32>& D, ffi::Buffer<ffi::F32>& z, ffi::Buffer<ffi::F32>& keep, int64_t softplus) {
  return Inputs{u.typed_data(), delta.typed_data(), bias.typed_data(), A.typed_data(), B.typed_data(),
                C.typed_data(), D.typed_data(), z.typed_data(), keep.typed_data(), softplus != 0,
                z.element_count() != 0};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> delta,
                   ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> A, ffi::Buffer<ffi::F32> B,
                   ffi::Buffer<ffi::F32> C, ffi::Buffer<ffi::F32> D, ffi::Buffer<ffi::F32> z,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> keep, int64_t chunk, int64_t softplus,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> hT,
                   ffi::ResultBuffer<ffi::F32> starts) {
  if (chunk < 1) return ffi::Error::InvalidArgument("chunk must be positive");
  const Dims s = dims_of(u, B, chunk);
  const Inputs in = inputs_of(u, delta, bias, A, B, C, D, z, keep, softplus);
  parallel_for(pool, s.b * s.g * s.jb, [&](int64_t item) {
    forward_item(s, in, item, h0.typed_data(), y->typed_data(), hT->typed_data(), starts->typed_data());
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// Gradients an item writes. dB, dC: per channel block (jb, b, l, g, n) (the
// outputs themselves when jb = 1); dA, dD, dbias: per batch row.
struct Grads {
  float *du, *ddelta, *dz, *dA, *dB, *dC, *dh0, *dD, *dbias;
};

void backward_item(const Dims& s, const Inputs& in, int64_t item, const float* starts, const float* dy,
                   const float* dhT, const Grads& out) {
  constexpr int64_t K = kBlock;
  const int64_t n = s.n, d = s.d, T = s.chunk;
  const Item it = item_of(s, item);
  const int64_t j = it.j, bi = it.bi, gi = it.gi, c0 = it.c0, P = it.P;
  std::vector<float> At_v(n * K, 0.0f), G_v(n * K, 0.0f), dA_v(n * K, 0.0f), hs_v((T + 1) * n * K, 0.0f),
      as_v(T * n * K, 0.0f), dts_v(T * K, 0.0f);
  float* __restrict At = At_v.data();
  float* __restrict G = G_v.data();  // the adjoint carried back in time
  float* __restrict dAacc = dA_v.data();
  float* __restrict hs = hs_v.data();    // hs[i]: the state before step t0 + i of the chunk
  float* __restrict as = as_v.data();    // as[i]: the decay (times the mask) of step t0 + i
  float* __restrict dts = dts_v.data();  // dts[i]: dt of step t0 + i
  alignas(64) float uv[K] = {}, dtu[K] = {}, dyv[K] = {}, sg[K], GB[K], GhaA[K], yc[K], dDacc[K] = {}, dbacc[K] = {};
  for (int64_t k = 0; k < n; ++k)
    for (int64_t c = 0; c < P; ++c) {
      At[k * K + c] = in.A[(c0 + c) * n + k];
      G[k * K + c] = dhT[(bi * d + c0 + c) * n + k];
    }
  const float* bias = in.bias + c0;
  const float* D = in.D + c0;
  for (int64_t ci = s.nc - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * T, len = std::min(T, s.l - t0);
    // Recompute the chunk's states from its boundary state.
    const float* st = starts + ((bi * s.nc + ci) * d + c0) * n;
    for (int64_t k = 0; k < n; ++k)
      for (int64_t c = 0; c < P; ++c) hs[k * K + c] = st[c * n + k];
    for (int64_t i = 0; i < len; ++i) {
      const int64_t t = t0 + i, row = (bi * s.l + t) * d + c0;
      const float* B_t = in.B + ((bi * s.l + t) * s.g + gi) * n;
      const float keep_t = in.keep[bi * s.l + t];
      const float* __restrict hp = hs + i * n * K;
      float* __restrict hn = hs + (i + 1) * n * K;
      float* __restrict ai = as + i * n * K;
      float* __restrict dtv = dts + i * K;
      const float* u = in.u + row;
      step_dt(in, in.delta + row, bias, P, dtv);
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) dtu[c] = dtv[c] * u[c];
      for (int64_t k = 0; k < n; ++k) {
        const float Bk = B_t[k];
        const float* __restrict Ak = At + k * K;
#pragma omp simd
        for (int64_t c = 0; c < K; ++c) {
          float a = fast_exp(dtv[c] * Ak[c]) * keep_t;
          ai[k * K + c] = a;
          hn[k * K + c] = a * hp[k * K + c] + Bk * dtu[c];
        }
      }
    }
    // One reverse pass: every gradient of a step together.
    for (int64_t i = len - 1; i >= 0; --i) {
      const int64_t t = t0 + i, row = (bi * s.l + t) * d + c0;
      const int64_t brow = ((bi * s.l + t) * s.g + gi) * n;
      const float* B_t = in.B + brow;
      const float* C_t = in.C + brow;
      const float* __restrict hp = hs + i * n * K;
      const float* __restrict hn = hs + (i + 1) * n * K;
      const float* __restrict ai = as + i * n * K;
      const float* __restrict dtv = dts + i * K;
      float* dB_t = out.dB + ((j * s.b + bi) * s.l + t) * s.g * n + gi * n;
      float* dC_t = out.dC + ((j * s.b + bi) * s.l + t) * s.g * n + gi * n;
      const float* u = in.u + row;
      const float* dyo = dy + row;
      const float* z = in.gate ? in.z + row : nullptr;
      if (in.gate) {
#pragma omp simd
        for (int64_t c = 0; c < P; ++c) {
          sg[c] = sigmoid(z[c]);
          dyv[c] = dyo[c] * z[c] * sg[c];  // d/d(y before the gate)
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < P; ++c) dyv[c] = dyo[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) {
        uv[c] = u[c];
        dtu[c] = dtv[c] * u[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) {
        GB[c] = 0.0f;
        GhaA[c] = 0.0f;
        yc[c] = 0.0f;
      }
      for (int64_t k = 0; k < n; ++k) {
        float* __restrict Gk = G + k * K;
        float* __restrict dAk = dAacc + k * K;
        const float* __restrict Ak = At + k * K;
        const float* __restrict hpk = hp + k * K;
        const float* __restrict hnk = hn + k * K;
        const float* __restrict ak = ai + k * K;
        const float Bk = B_t[k], Ck = C_t[k];
        float dBk = 0.0f, dCk = 0.0f;
#pragma omp simd reduction(+ : dBk, dCk)
        for (int64_t c = 0; c < K; ++c) {
          float a = ak[c];
          float g = Gk[c] + Ck * dyv[c];  // gradient of this step's state
          float gha = g * hpk[c] * a;     // through the decay: d a / d dt = A a
          GB[c] += g * Bk;
          GhaA[c] += gha * Ak[c];
          dAk[c] += gha * dtv[c];
          dBk += g * dtu[c];
          dCk += hnk[c] * dyv[c];
          yc[c] += Ck * hnk[c];
          Gk[c] = a * g;
        }
        dB_t[k] = dBk;
        dC_t[k] = dCk;
      }
      const float* delta = in.delta + row;
      float* du = out.du + row;
      float* ddelta = out.ddelta + row;
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) {
        du[c] = GB[c] * dtv[c] + dyv[c] * D[c];
        dDacc[c] += dyv[c] * uv[c];
      }
      if (in.softplus) {
#pragma omp simd
        for (int64_t c = 0; c < P; ++c) {
          float g = (GhaA[c] + GB[c] * uv[c]) * sigmoid(delta[c] + bias[c]);
          ddelta[c] = g;
          dbacc[c] += g;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < P; ++c) {
          float g = GhaA[c] + GB[c] * uv[c];
          ddelta[c] = g;
          dbacc[c] += g;
        }
      }
      if (in.gate) {
        float* dz = out.dz + row;
#pragma omp simd
        for (int64_t c = 0; c < P; ++c) {
          dz[c] = dyo[c] * (yc[c] + D[c] * uv[c]) * sg[c] * (1.0f + z[c] * (1.0f - sg[c]));
        }
      }
    }
  }
  for (int64_t c = 0; c < P; ++c) {
    for (int64_t k = 0; k < n; ++k) {
      out.dh0[(bi * d + c0 + c) * n + k] = G[k * K + c];
      out.dA[(bi * d + c0 + c) * n + k] = dAacc[k * K + c];
    }
    out.dD[bi * d + c0 + c] = dDacc[c];
    out.dbias[bi * d + c0 + c] = dbacc[c];
  }
}

// out[r] = sum over j of part[j, r] (rows of `width` floats), j in increasing order.
void sum_blocks(ffi::ThreadPool& pool, const float* part, int64_t blocks, int64_t rows, int64_t width, float* out) {
  constexpr int64_t kRows = 64;
  parallel_for(pool, (rows + kRows - 1) / kRows, [&](int64_t task) {
    const int64_t r1 = std::min(rows, (task + 1) * kRows);
    for (int64_t r = task * kRows; r < r1; ++r) {
      float* o = out + r * width;
      std::memcpy(o, part + r * width, width * sizeof(float));
      for (int64_t j = 1; j < blocks; ++j) {
        const float* pj = part + (j * rows + r) * width;
#pragma omp simd
        for (int64_t e = 0; e < width; ++e) o[e] += pj[e];
      }
    }
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> delta,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> A, ffi::Buffer<ffi::F32> B,
                    ffi::Buffer<ffi::F32> C, ffi::Buffer<ffi::F32> D, ffi::Buffer<ffi::F32> z,
                    ffi::Buffer<ffi::F32> keep, ffi::Buffer<ffi::F32> starts, ffi::Buffer<ffi::F32> dy,
                    ffi::Buffer<ffi::F32> dhT, int64_t chunk, int64_t softplus, ffi::ResultBuffer<ffi::F32> du,
                    ffi::ResultBuffer<ffi::F32> ddelta, ffi::ResultBuffer<ffi::F32> dz,
                    ffi::ResultBuffer<ffi::F32> dA, ffi::ResultBuffer<ffi::F32> dB,
                    ffi::ResultBuffer<ffi::F32> dC, ffi::ResultBuffer<ffi::F32> dh0,
                    ffi::ResultBuffer<ffi::F32> dD, ffi::ResultBuffer<ffi::F32> dbias) {
  if (chunk < 1) return ffi::Error::InvalidArgument("chunk must be positive");
  const Dims s = dims_of(u, B, chunk);
  const Inputs in = inputs_of(u, delta, bias, A, B, C, D, z, keep, softplus);
  // With more than one channel block per group, dB and dC go to per-block partials
  // first (every element is written, so the buffers are left uninitialised).
  const int64_t rows = s.b * s.l, width = s.g * s.n;
  std::unique_ptr<float[]> dB_part, dC_part;
  Grads out{du->typed_data(), ddelta->typed_data(), dz->typed_data(), dA->typed_data(), dB->typed_data(),
            dC->typed_data(), dh0->typed_data(), dD->typed_data(), dbias->typed_data()};
  if (s.jb > 1) {
    dB_part.reset(new float[s.jb * rows * width]);
    dC_part.reset(new float[s.jb * rows * width]);
    out.dB = dB_part.get();
    out.dC = dC_part.get();
  }
  parallel_for(pool, s.b * s.g * s.jb, [&](int64_t item) {
    backward_item(s, in, item, starts.typed_data(), dy.typed_data(), dhT.typed_data(), out);
  });
  if (s.jb > 1) {
    sum_blocks(pool, dB_part.get(), s.jb, rows, width, dB->typed_data());
    sum_blocks(pool, dC_part.get(), s.jb, rows, width, dC->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaSelectiveScanFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u (b, l, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta (b, l, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias (d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A (d, n)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B (b, l, g, n)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C (b, l, g, n)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // D (d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z (b, l, d), or size 0: no gate
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 (b, d, n)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep (b, l)
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("softplus")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y (b, l, d)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hT (b, d, n)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // starts (b, nc, d, n)

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaSelectiveScanBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // D
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // starts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy (b, l, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhT (b, d, n)
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("softplus")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // du (b, l, d)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ddelta (b, l, d)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz (b, l, d), or size 0
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dA per batch row (b, d, n)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dB (b, l, g, n)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dC (b, l, g, n)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh0 (b, d, n)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dD per batch row (b, d)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias per batch row (b, d)
