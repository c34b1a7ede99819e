// XLA FFI handler: c[g] = op(a[g]) @ op(b[g]) for row-major float32 operands, computed by a BLAS sgemm_
// (MKL's) on XLA's own CPU thread pool. XLA:CPU's GEMMs reach ~85% of MKL's on AVX-512 machines, and it
// runs the small batched matmuls of attention on one thread; this handler closes both gaps.
//
// The work is split into chunks (row or column blocks of a single GEMM, or slices of the batch) that the
// calling thread and tasks scheduled on XLA's pool take from a shared counter, each running MKL with one
// thread: no second thread pool competes with XLA's, and a caller whose pool is busy does every chunk itself
// instead of waiting for a task that cannot start (no deadlock when two such calls run side by side).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using SetLocalThreadsFn = int (*)(const int*);  // MKL's mkl_set_num_threads_local_ (Fortran ABI)

static SgemmFn sgemm = nullptr;
static SetLocalThreadsFn set_local_threads = nullptr;

extern "C" void mvlp_blas_init(void* sgemm_fn, void* set_local_threads_fn) {
  sgemm = reinterpret_cast<SgemmFn>(sgemm_fn);
  set_local_threads = reinterpret_cast<SetLocalThreadsFn>(set_local_threads_fn);
}

namespace {

constexpr int kMinRowsPerChunk = 64;  // smaller row blocks of one GEMM lose more to packing than they gain

struct Gemm {
  int batch, m, n, k, lda, ldb, ldc;
  char op_a, op_b;
  bool split_rows;  // one GEMM: chunks are row blocks of c (else column blocks); batched: slices of the batch
  int extent, chunk, chunks;
  const float* a;
  const float* b;
  float* c;
  std::atomic<int> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  // BLAS is column-major: row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T.
  void Call(const float* a_, const float* b_, float* c_, int rows, int cols) const {
    const float one = 1.0f, zero = 0.0f;
    sgemm(&op_b, &op_a, &cols, &rows, &k, &one, b_, &ldb, a_, &lda, &zero, c_, &ldc);
  }

  void RunChunk(int i) const {
    const int lo = i * chunk, hi = std::min(extent, lo + chunk);
    if (batch > 1) {
      for (int g = lo; g < hi; ++g)
        Call(a + int64_t{g} * m * k, b + int64_t{g} * k * n, c + int64_t{g} * m * n, m, n);
    } else if (split_rows) {
      Call(op_a == 'T' ? a + lo : a + int64_t{lo} * lda, b, c + int64_t{lo} * ldc, hi - lo, n);
    } else {
      Call(a, op_b == 'T' ? b + int64_t{lo} * ldb : b + lo, c + lo, m, hi - lo);
    }
  }

  void Work() {
    const int one = 1;
    const int previous = set_local_threads(&one);
    for (int i; (i = next.fetch_add(1)) < chunks;) {
      RunChunk(i);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
    set_local_threads(&previous);
  }

  // Sleeps, not spins: on a busy machine the chunk being waited for may need this very core.
  void WaitAll() {
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [this] { return done.load(std::memory_order_acquire) == chunks; });
  }
};

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  if (sgemm == nullptr) return ffi::Error::Internal("mvlp_blas_gemm: no BLAS loaded (mvlp_blas_init not called)");
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 3 || bd.size() != 3 || cd.size() != 3 || ad[0] != bd[0] || cd[0] != ad[0])
    return ffi::Error::InvalidArgument("mvlp_blas_gemm: operands must be (batch, rows, cols) with one batch size");
  auto job = std::make_shared<Gemm>();
  job->batch = ad[0];
  job->m = transpose_a ? ad[2] : ad[1];
  job->k = transpose_a ? ad[1] : ad[2];
  job->n = transpose_b ? bd[1] : bd[2];
  if ((transpose_b ? bd[2] : bd[1]) != job->k || cd[1] != job->m || cd[2] != job->n)
    return ffi::Error::InvalidArgument("mvlp_blas_gemm: shapes do not chain");
  job->lda = std::max(1, transpose_a ? job->m : job->k);
  job->ldb = std::max(1, transpose_b ? job->k : job->n);
  job->ldc = std::max(1, job->n);
  job->op_a = transpose_a ? 'T' : 'N';
  job->op_b = transpose_b ? 'T' : 'N';
  job->a = a.typed_data();
  job->b = b.typed_data();
  job->c = c->typed_data();
  const int threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  const int wanted = 2 * threads;  // two chunks per thread even out uneven progress
  job->split_rows = job->m >= job->n;
  job->extent = job->batch > 1 ? job->batch : (job->split_rows ? job->m : job->n);
  job->chunk = (job->extent + wanted - 1) / wanted;
  if (job->batch == 1) job->chunk = std::max(job->chunk, kMinRowsPerChunk);
  job->chunk = std::max(job->chunk, 1);
  job->chunks = (job->extent + job->chunk - 1) / job->chunk;
  if (job->m == 0 || job->n == 0 || job->batch == 0) return ffi::Error::Success();
  for (int t = 1; t < std::min(threads, job->chunks); ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  job->WaitAll();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvlpBlasGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
