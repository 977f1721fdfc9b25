// Selective scan core on CPU, forward and backward, as XLA FFI handlers.
//
// The core of mamba_jax.ops.selective_scan after `prepare` (float32, dt with
// bias and softplus applied) and before `finish` (D and the gate stay in XLA):
//
//   h_t = keep_t * exp(dt_t A) h_{t-1} + dt_t u_t B_t      (per channel c, state index k)
//   y_t = sum_k C_t[k] h_t[k]
//
// Layouts (row-major, as XLA passes them): u, dt, y, du, ddt (b, l, d); A (d, n);
// B, C (b, l, g, n); keep (b, l); h0, hT, dh0 (b, d, n); starts (b, nc, d, n),
// the state before each chunk of `chunk` steps (nc = ceil(l / chunk)); channel c
// uses group c / (d / g).
//
// Work is split into items (batch row, group, block of up to kBlock channels);
// the split does not depend on the number of threads, and every output element
// is written by exactly one item, so the results are the same bits whatever the
// thread count. Reductions over channels (dB, dC) are written per channel block
// as partials (jb, b, l, g, n), summed over jb in XLA in a fixed order; dA is
// written per batch row (b, d, n) and summed over b in XLA.
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

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

void forward_item(const Dims& s, int64_t item, const float* u, const float* dt, const float* A, const float* B,
                  const float* C, const float* h0, const float* keep, float* y, float* hT, float* starts) {
  constexpr int64_t K = kBlock;
  const int64_t n = s.n, d = s.d;
  const int64_t j = item % s.jb, gi = (item / s.jb) % s.g, bi = item / (s.jb * s.g);
  const int64_t c0 = gi * s.p + j * K;
  const int64_t P = std::min(K, s.p - j * K);
  // Channels past P (a last, partial block) run as padding lanes: dt = u = 0, never stored.
  std::vector<float> At_v(n * K, 0.0f), h_v(n * K, 0.0f);
  float* __restrict At = At_v.data();
  float* __restrict h = h_v.data();
  alignas(64) float dtv[K] = {}, dtu[K] = {}, yt[K];
  for (int64_t k = 0; k < n; ++k)
    for (int64_t c = 0; c < P; ++c) {
      At[k * K + c] = A[(c0 + c) * n + k];
      h[k * K + c] = h0[(bi * d + c0 + c) * n + k];
    }
  for (int64_t t = 0; t < s.l; ++t) {
    if (t % s.chunk == 0) {
      float* st = starts + ((bi * s.nc + t / s.chunk) * d + c0) * n;
      for (int64_t c = 0; c < P; ++c)
        for (int64_t k = 0; k < n; ++k) st[c * n + k] = h[k * K + c];
    }
    const int64_t row = (bi * s.l + t) * d + c0;
    const float* B_t = B + ((bi * s.l + t) * s.g + gi) * n;
    const float* C_t = C + ((bi * s.l + t) * s.g + gi) * n;
    const float keep_t = keep[bi * s.l + t];
    for (int64_t c = 0; c < P; ++c) {
      dtv[c] = dt[row + c];
      dtu[c] = dt[row + c] * u[row + c];
    }
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
    std::memcpy(y + row, yt, P * sizeof(float));
  }
  for (int64_t c = 0; c < P; ++c)
    for (int64_t k = 0; k < n; ++k) hT[(bi * d + c0 + c) * n + k] = h[k * K + c];
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> dt,
                   ffi::Buffer<ffi::F32> A, ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> keep, int64_t chunk,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> hT,
                   ffi::ResultBuffer<ffi::F32> starts) {
  if (chunk < 1) return ffi::Error::InvalidArgument("chunk must be positive");
  const Dims s = dims_of(u, B, chunk);
  parallel_for(pool, s.b * s.g * s.jb, [&](int64_t item) {
    forward_item(s, item, u.typed_data(), dt.typed_data(), A.typed_data(), B.typed_data(), C.typed_data(),
                 h0.typed_data(), keep.typed_data(), y->typed_data(), hT->typed_data(), starts->typed_data());
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

void backward_item(const Dims& s, int64_t item, const float* u, const float* dt, const float* A, const float* B,
                   const float* C, const float* keep, const float* starts, const float* dy, const float* dhT,
                   float* du, float* ddt, float* dA, float* dB, float* dC, float* dh0) {
  constexpr int64_t K = kBlock;
  const int64_t n = s.n, d = s.d, T = s.chunk;
  const int64_t j = item % s.jb, gi = (item / s.jb) % s.g, bi = item / (s.jb * s.g);
  const int64_t c0 = gi * s.p + j * K;
  const int64_t P = std::min(K, s.p - j * K);
  // Channels past P (a last, partial block) run as padding lanes: dt = u = dy = 0,
  // state and adjoint 0, so they add nothing to the sums over channels.
  std::vector<float> At_v(n * K, 0.0f), G_v(n * K, 0.0f), dA_v(n * K, 0.0f), hs_v((T + 1) * n * K, 0.0f),
      as_v(T * n * K, 0.0f);
  float* __restrict At = At_v.data();
  float* __restrict G = G_v.data();  // the adjoint carried back in time
  float* __restrict dAacc = dA_v.data();
  float* __restrict hs = hs_v.data();  // hs[i]: the state before step t0 + i of the chunk
  float* __restrict as = as_v.data();  // as[i]: the decay (times the mask) of step t0 + i
  alignas(64) float dtv[K] = {}, uv[K] = {}, dtu[K] = {}, dyv[K] = {}, GB[K], GhaA[K];
  for (int64_t k = 0; k < n; ++k)
    for (int64_t c = 0; c < P; ++c) {
      At[k * K + c] = A[(c0 + c) * n + k];
      G[k * K + c] = dhT[(bi * d + c0 + c) * n + k];
    }
  for (int64_t ci = s.nc - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * T, len = std::min(T, s.l - t0);
    // Recompute the chunk's states from its boundary state.
    const float* st = starts + ((bi * s.nc + ci) * d + c0) * n;
    for (int64_t k = 0; k < n; ++k)
      for (int64_t c = 0; c < P; ++c) hs[k * K + c] = st[c * n + k];
    for (int64_t i = 0; i < len; ++i) {
      const int64_t t = t0 + i, row = (bi * s.l + t) * d + c0;
      const float* B_t = B + ((bi * s.l + t) * s.g + gi) * n;
      const float keep_t = keep[bi * s.l + t];
      const float* __restrict hp = hs + i * n * K;
      float* __restrict hn = hs + (i + 1) * n * K;
      float* __restrict ai = as + i * n * K;
      for (int64_t c = 0; c < P; ++c) {
        dtv[c] = dt[row + c];
        dtu[c] = dt[row + c] * u[row + c];
      }
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
      const float* B_t = B + brow;
      const float* C_t = C + brow;
      const float* __restrict hp = hs + i * n * K;
      const float* __restrict hn = hs + (i + 1) * n * K;
      const float* __restrict ai = as + i * n * K;
      float* dB_t = dB + ((j * s.b + bi) * s.l + t) * s.g * n + gi * n;
      float* dC_t = dC + ((j * s.b + bi) * s.l + t) * s.g * n + gi * n;
      for (int64_t c = 0; c < P; ++c) {
        dtv[c] = dt[row + c];
        uv[c] = u[row + c];
        dtu[c] = dtv[c] * uv[c];
        dyv[c] = dy[row + c];
      }
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) {
        GB[c] = 0.0f;
        GhaA[c] = 0.0f;
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
          Gk[c] = a * g;
        }
        dB_t[k] = dBk;
        dC_t[k] = dCk;
      }
      for (int64_t c = 0; c < P; ++c) {
        du[row + c] = GB[c] * dtv[c];
        ddt[row + c] = GhaA[c] + GB[c] * uv[c];
      }
    }
  }
  for (int64_t c = 0; c < P; ++c)
    for (int64_t k = 0; k < n; ++k) {
      dh0[(bi * d + c0 + c) * n + k] = G[k * K + c];
      dA[(bi * d + c0 + c) * n + k] = dAacc[k * K + c];
    }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> dt,
                    ffi::Buffer<ffi::F32> A, ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C,
                    ffi::Buffer<ffi::F32> keep, ffi::Buffer<ffi::F32> starts, ffi::Buffer<ffi::F32> dy,
                    ffi::Buffer<ffi::F32> dhT, int64_t chunk, ffi::ResultBuffer<ffi::F32> du,
                    ffi::ResultBuffer<ffi::F32> ddt, ffi::ResultBuffer<ffi::F32> dA,
                    ffi::ResultBuffer<ffi::F32> dB, ffi::ResultBuffer<ffi::F32> dC,
                    ffi::ResultBuffer<ffi::F32> dh0) {
  if (chunk < 1) return ffi::Error::InvalidArgument("chunk must be positive");
  const Dims s = dims_of(u, B, chunk);
  parallel_for(pool, s.b * s.g * s.jb, [&](int64_t item) {
    backward_item(s, item, u.typed_data(), dt.typed_data(), A.typed_data(), B.typed_data(), C.typed_data(),
                  keep.typed_data(), starts.typed_data(), dy.typed_data(), dhT.typed_data(), du->typed_data(),
                  ddt->typed_data(), dA->typed_data(), dB->typed_data(), dC->typed_data(), dh0->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaSelectiveScanFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u (b, l, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dt (b, l, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A (d, n)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B (b, l, g, n)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C (b, l, g, n)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 (b, d, n)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep (b, l)
                                  .Attr<int64_t>("chunk")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y (b, l, d)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hT (b, d, n)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // starts (b, nc, d, n)

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaSelectiveScanBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dt
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // starts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy (b, l, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhT (b, d, n)
                                  .Attr<int64_t>("chunk")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // du (b, l, d)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ddt (b, l, d)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dA per batch row (b, d, n)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dB partials (jb, b, l, g, n)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dC partials (jb, b, l, g, n)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dh0 (b, d, n)
