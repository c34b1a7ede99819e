// XLA FFI handlers on MKL for float32 on CPU, run on XLA's own thread pool:
//   mvlp_gemm:           c[g] = op(a[g]) @ op(b[g]), row-major (XLA:CPU's GEMMs reach ~85% of MKL's FLOP/s on
//                        AVX-512 machines, and it runs attention's small batched matmuls on one thread).
//   mvlp_attention_fwd:  out = softmax(scale q k^T) v per (batch, head), with q, k, v, out in (B, L, H, D)
//   mvlp_attention_bwd:  layout, so the projections need no heads-major copies; each head's (Q, K) scores
//                        stay in cache between their GEMMs and the softmax instead of making XLA's four
//                        passes over a (B, H, Q, K) tensor (MAE B/16's decoder: 40 MB per layer).
//
// Work is split into chunks (row or column blocks of one GEMM, or groups of (batch, head) pairs) that the
// calling thread and tasks scheduled on XLA's pool take from a shared counter, each running MKL on one
// thread: no second thread pool competes with XLA's, and a caller whose pool is busy does every chunk
// itself instead of waiting for a task that cannot start (no deadlock when two calls run side by side).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// MKL entry points, handed over by mvlp_mkl_init (from whichever library exports them).
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using SetLocalThreadsFn = int (*)(const int*);  // mkl_set_num_threads_local_ (Fortran ABI)
using VsExpFn = void (*)(int, const float*, float*);

static SgemmFn sgemm = nullptr;
static SetLocalThreadsFn set_local_threads = nullptr;
static VsExpFn vs_exp = nullptr;

extern "C" void mvlp_mkl_init(void* sgemm_fn, void* set_local_threads_fn, void* vs_exp_fn) {
  sgemm = reinterpret_cast<SgemmFn>(sgemm_fn);
  set_local_threads = reinterpret_cast<SetLocalThreadsFn>(set_local_threads_fn);
  vs_exp = reinterpret_cast<VsExpFn>(vs_exp_fn);
}

namespace {

// Row-major c (m, n) = alpha op(a) op(b) + beta c. BLAS is column-major: this is c^T = op(b)^T op(a)^T.
void Gemm(bool transpose_a, bool transpose_b, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  const char op_a = transpose_a ? 'T' : 'N', op_b = transpose_b ? 'T' : 'N';
  sgemm(&op_b, &op_a, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

struct Chunks {
  std::function<void(int)> run;
  int count = 0;
  std::atomic<int> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Work() {
    const int one = 1;
    const int previous = set_local_threads(&one);
    for (int i; (i = next.fetch_add(1)) < count;) {
      run(i);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == count) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
    set_local_threads(&previous);
  }
};

// run(0 .. count-1) on the caller and XLA's pool. A task that starts after the caller finished every chunk
// finds the counter exhausted and returns without touching `run`'s (by then dead) captures.
void ParallelFor(ffi::ThreadPool& pool, int count, std::function<void(int)> run) {
  if (count <= 0) return;
  auto chunks = std::make_shared<Chunks>();
  chunks->run = std::move(run);
  chunks->count = count;
  const int threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  for (int t = 1; t < std::min(threads, count); ++t) pool.Schedule([chunks] { chunks->Work(); });
  chunks->Work();
  std::unique_lock<std::mutex> lock(chunks->mutex);  // sleep, not spin: the last chunk may need this core
  chunks->finished.wait(lock, [&] { return chunks->done.load(std::memory_order_acquire) == count; });
}

// Two chunks per thread even out uneven progress.
int ChunkSize(ffi::ThreadPool& pool, int extent, int minimum) {
  const int wanted = 2 * static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  return std::max({(extent + wanted - 1) / wanted, minimum, 1});
}

constexpr int kMinRowsPerChunk = 64;  // smaller row blocks of one GEMM lose more to packing than they gain

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 3 || bd.size() != 3 || cd.size() != 3 || ad[0] != bd[0] || cd[0] != ad[0])
    return ffi::Error::InvalidArgument("mvlp_gemm: operands must be (batch, rows, cols) with one batch size");
  const int batch = ad[0], m = transpose_a ? ad[2] : ad[1], k = transpose_a ? ad[1] : ad[2];
  const int n = transpose_b ? bd[1] : bd[2];
  if ((transpose_b ? bd[2] : bd[1]) != k || cd[1] != m || cd[2] != n)
    return ffi::Error::InvalidArgument("mvlp_gemm: shapes do not chain");
  const int lda = std::max(1, transpose_a ? m : k), ldb = std::max(1, transpose_b ? k : n), ldc = std::max(1, n);
  const float *A = a.typed_data(), *B = b.typed_data();
  float* C = c->typed_data();
  if (m == 0 || n == 0 || batch == 0) return ffi::Error::Success();
  if (batch > 1) {  // chunks are slices of the batch
    const int size = ChunkSize(pool, batch, 1);
    ParallelFor(pool, (batch + size - 1) / size, [&](int i) {
      for (int g = i * size; g < std::min(batch, (i + 1) * size); ++g)
        Gemm(transpose_a, transpose_b, m, n, k, 1.0f, A + int64_t{g} * m * k, lda, B + int64_t{g} * k * n, ldb,
             0.0f, C + int64_t{g} * m * n, ldc);
    });
  } else if (m >= n) {  // row blocks of c
    const int size = ChunkSize(pool, m, kMinRowsPerChunk);
    ParallelFor(pool, (m + size - 1) / size, [&](int i) {
      const int lo = i * size, rows = std::min(m, lo + size) - lo;
      Gemm(transpose_a, transpose_b, rows, n, k, 1.0f, transpose_a ? A + lo : A + int64_t{lo} * lda, lda, B, ldb,
           0.0f, C + int64_t{lo} * ldc, ldc);
    });
  } else {  // column blocks of c
    const int size = ChunkSize(pool, n, kMinRowsPerChunk);
    ParallelFor(pool, (n + size - 1) / size, [&](int i) {
      const int lo = i * size, cols = std::min(n, lo + size) - lo;
      Gemm(transpose_a, transpose_b, m, cols, k, 1.0f, A, lda, transpose_b ? B + int64_t{lo} * ldb : B + lo, ldb,
           0.0f, C + lo, ldc);
    });
  }
  return ffi::Error::Success();
}

// (B, L, H, D) tensors: head h of batch b is an (L, D) matrix at b*L*H*D + h*D with row stride H*D.
struct Heads {
  int batch, q_len, k_len, heads, dim;
  int64_t q_offset(int unit) const { return int64_t{unit / heads} * q_len * heads * dim + (unit % heads) * dim; }
  int64_t k_offset(int unit) const { return int64_t{unit / heads} * k_len * heads * dim + (unit % heads) * dim; }
  int ld() const { return heads * dim; }
};

bool SameShape(const ffi::Buffer<ffi::F32>& a, const ffi::Buffer<ffi::F32>& b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  return std::equal(ad.begin(), ad.end(), bd.begin(), bd.end());
}

std::optional<Heads> DecodeHeads(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3]) return std::nullopt;
  return Heads{static_cast<int>(qd[0]), static_cast<int>(qd[1]), static_cast<int>(kd[1]), static_cast<int>(qd[2]),
               static_cast<int>(qd[3])};
}

void SoftmaxRows(float* p, int rows, int cols) {
  for (int i = 0; i < rows; ++i) {
    float* row = p + int64_t{i} * cols;
    const float top = *std::max_element(row, row + cols);
    for (int j = 0; j < cols; ++j) row[j] -= top;
    vs_exp(cols, row, row);
    float sum = 0.0f;
    for (int j = 0; j < cols; ++j) sum += row[j];
    const float inverse = 1.0f / sum;
    for (int j = 0; j < cols; ++j) row[j] *= inverse;
  }
}

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> weights, float scale) {
  auto shape = DecodeHeads(q, k);
  if (!shape || !SameShape(v, k))
    return ffi::Error::InvalidArgument("mvlp_attention_fwd: q (B,Q,H,D), k and v (B,K,H,D)");
  const Heads s = *shape;
  const float *Q = q.typed_data(), *K = k.typed_data(), *V = v.typed_data();
  float *O = out->typed_data(), *P = weights->typed_data();
  const int units = s.batch * s.heads, size = ChunkSize(pool, units, 1);
  ParallelFor(pool, (units + size - 1) / size, [&](int i) {
    for (int u = i * size; u < std::min(units, (i + 1) * size); ++u) {
      float* p = P + int64_t{u} * s.q_len * s.k_len;
      Gemm(false, true, s.q_len, s.k_len, s.dim, scale, Q + s.q_offset(u), s.ld(), K + s.k_offset(u), s.ld(), 0.0f,
           p, s.k_len);
      SoftmaxRows(p, s.q_len, s.k_len);
      Gemm(false, false, s.q_len, s.dim, s.k_len, 1.0f, p, s.k_len, V + s.k_offset(u), s.ld(), 0.0f,
           O + s.q_offset(u), s.ld());
    }
  });
  return ffi::Error::Success();
}

// Softmax's backward with rowsum(dP * P) taken as rowsum(dO * O) (FlashAttention's identity).
ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> out,
                            ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_q,
                            ffi::ResultBuffer<ffi::F32> d_k, ffi::ResultBuffer<ffi::F32> d_v, float scale) {
  auto shape = DecodeHeads(q, k);
  if (!shape || !SameShape(v, k) || !SameShape(d_out, q) || !SameShape(out, q))
    return ffi::Error::InvalidArgument("mvlp_attention_bwd: q (B,Q,H,D), k and v (B,K,H,D)");
  const Heads s = *shape;
  const float *Q = q.typed_data(), *K = k.typed_data(), *V = v.typed_data(), *P = weights.typed_data();
  const float *O = out.typed_data(), *dO = d_out.typed_data();
  float *dQ = d_q->typed_data(), *dK = d_k->typed_data(), *dV = d_v->typed_data();
  const int units = s.batch * s.heads, size = ChunkSize(pool, units, 1);
  ParallelFor(pool, (units + size - 1) / size, [&](int i) {
    std::vector<float> d_scores(int64_t{s.q_len} * s.k_len);
    float* ds = d_scores.data();
    for (int u = i * size; u < std::min(units, (i + 1) * size); ++u) {
      const float* p = P + int64_t{u} * s.q_len * s.k_len;
      const float *q_u = Q + s.q_offset(u), *k_u = K + s.k_offset(u), *v_u = V + s.k_offset(u);
      const float *o_u = O + s.q_offset(u), *do_u = dO + s.q_offset(u);
      Gemm(false, true, s.q_len, s.k_len, s.dim, 1.0f, do_u, s.ld(), v_u, s.ld(), 0.0f, ds, s.k_len);  // dP
      for (int r = 0; r < s.q_len; ++r) {
        float row_dot = 0.0f;
        for (int d = 0; d < s.dim; ++d) row_dot += do_u[int64_t{r} * s.ld() + d] * o_u[int64_t{r} * s.ld() + d];
        float* ds_row = ds + int64_t{r} * s.k_len;
        const float* p_row = p + int64_t{r} * s.k_len;
        for (int c = 0; c < s.k_len; ++c) ds_row[c] = p_row[c] * (ds_row[c] - row_dot);
      }
      Gemm(false, false, s.q_len, s.dim, s.k_len, scale, ds, s.k_len, k_u, s.ld(), 0.0f, dQ + s.q_offset(u), s.ld());
      Gemm(true, false, s.k_len, s.dim, s.q_len, scale, ds, s.k_len, q_u, s.ld(), 0.0f, dK + s.k_offset(u), s.ld());
      Gemm(true, false, s.k_len, s.dim, s.q_len, 1.0f, p, s.k_len, do_u, s.ld(), 0.0f, dV + s.k_offset(u), s.ld());
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvlpGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvlpAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvlpAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
