// cov += x^T x on CUDA through cuBLAS: bf16/fp16/fp32 inputs read in place, fp32 accumulation and
// output, beta = 1 straight into views of the fp32 accumulator (no fp32 copy of x, no (d, d)
// temporary).
//
// Layout (the part that is easy to get wrong). Torch tensors are row-major, cuBLAS is column-major.
// A row-major (R x C) matrix with leading dimension ld is, read by cuBLAS, the column-major (C x R)
// matrix of its transpose with the same ld. So, with ldx = x.stride(0) and d = cov.size(0):
//
//   x   (n, d) row-major, ld ldx   ==  Xc  = x^T   (d x n) column-major, ld ldx
//   cov (d, d) row-major, ld d     ==  Cc  = cov^T (d x d) column-major, ld d
//
// and the row-major block cov[r0:r1, c0:c1] is the column-major (c1-c0) x (r1-r0) block of Cc
// starting at cov + r0 * d + c0 (ld d). We want, for r in [r0, r1), c in [c0, c1):
//
//   cov[r, c] += sum_k x[k, r] * x[k, c]
//   <=>  Cc[c, r] += sum_k Xc[c, k] * Xc[r, k]       i.e.  Cc_blk += A * B^T with
//        A = Xc[c0:c1, :]  (column-major (c1-c0) x n, pointer x + c0, ld ldx, op N)
//        B = Xc[r0:r1, :]  (column-major (r1-r0) x n, pointer x + r0, ld ldx, op T)
//
// so every GEMM here is cublasGemmEx(N, T, m = c1-c0, n = r1-r0, k = tokens, A = x + c0,
// B = x + r0, C = cov + r0 * d + c0, ldc = d). Note the column offset goes into A and the row offset
// into B: swapping them would write the mirrored (lower-triangle) block. The diagonal blocks are
// symmetric, so there the distinction does not matter; off the diagonal it does.
//
// upper_only: column block [j0, j1) of the upper triangle is
//   * cov[0:j0, j0:j1] += X[:, 0:j0]^T X[:, j0:j1]   one GEMM written straight into cov (rows < j0 <=
//     cols, so strictly above the diagonal), and
//   * cov[j0:j1, j0:j1] += triu(X[:, j0:j1]^T X[:, j0:j1])   one GEMM (beta = 0) into a (b x b) fp32
//     temporary, then a small kernel adds its upper triangle (diagonal included). The strict lower
//     triangle of cov is never written, as in the reference.
// This computes about (d^2 / 2 + d * block / 2) of the d^2 entries. Without upper_only it is one GEMM
// over the full square.
//
// Precision: CUBLAS_COMPUTE_32F for every input dtype, never TF32: the handle's math mode is pinned to
// CUBLAS_DEFAULT_MATH for the call (torch sets CUBLAS_TF32_TENSOR_OP_MATH on its shared handle when
// torch.backends.cuda.matmul.allow_tf32 is on, and that would silently round fp32 inputs to TF32).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "ops.h"

namespace corda {
namespace {

// cov[i, j] += tmp[i, j] for 0 <= i <= j < b; cov has row stride ldc, tmp is a contiguous (b, b).
constexpr int kTileX = 32;
constexpr int kTileY = 8;

__global__ void add_upper_triangle_kernel(float* __restrict__ cov, int64_t ldc, const float* __restrict__ tmp,
                                          int b) {
  const int col = blockIdx.x * kTileX + threadIdx.x;
  if (col >= b) return;
  // Grid-stride over rows: gridDim.y is capped at 65535, b is not.
  for (int row = blockIdx.y * kTileY + threadIdx.y; row <= col; row += gridDim.y * kTileY) {
    cov[static_cast<int64_t>(row) * ldc + col] += tmp[static_cast<int64_t>(row) * b + col];
  }
}

void add_upper_triangle(float* cov, int64_t ldc, const float* tmp, int b, cudaStream_t stream) {
  const dim3 threads(kTileX, kTileY);
  const dim3 grid((b + kTileX - 1) / kTileX, std::min((b + kTileY - 1) / kTileY, 65535));
  add_upper_triangle_kernel<<<grid, threads, 0, stream>>>(cov, ldc, tmp, b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kFloat:
      return CUDA_R_32F;
    default:
      TORCH_CHECK(false, "covariance_update_cublas: x must be bfloat16, float16 or float32, got ", t);
  }
}

// Pins the math and pointer modes of torch's shared cuBLAS handle for one call and restores them.
class HandleModeGuard {
 public:
  explicit HandleModeGuard(cublasHandle_t handle) : handle_(handle) {
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle_, &math_));
    TORCH_CUDABLAS_CHECK(cublasGetPointerMode(handle_, &pointer_));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH));
    TORCH_CUDABLAS_CHECK(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_HOST));
  }
  ~HandleModeGuard() {
    // Destructors must not throw; the modes were readable a moment ago, so these cannot fail.
    cublasSetMathMode(handle_, math_);
    cublasSetPointerMode(handle_, pointer_);
  }
  HandleModeGuard(const HandleModeGuard&) = delete;
  HandleModeGuard& operator=(const HandleModeGuard&) = delete;

 private:
  cublasHandle_t handle_;
  cublasMath_t math_;
  cublasPointerMode_t pointer_;
};

struct GemmContext {
  cublasHandle_t handle;
  cudaDataType_t x_type;
  cublasComputeType_t compute;
  const char* x;      // first row of the current token chunk
  int64_t elem_size;  // bytes per element of x
  int ldx;
  int k;              // tokens in the current chunk
  float* cov;
  int64_t d;
};

// cov[r0:r0+rows, c0:c0+cols] (row-major, ld ldc) = beta * itself + X[:, r0:r0+rows]^T X[:, c0:c0+cols]
// (see the layout note at the top: the column offset goes into A, the row offset into B).
void gemm_block(const GemmContext& g, int64_t r0, int64_t rows, int64_t c0, int64_t cols, float* c, int64_t ldc,
                float beta) {
  const float alpha = 1.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(g.handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(cols),
                                    static_cast<int>(rows), g.k, &alpha, g.x + c0 * g.elem_size, g.x_type, g.ldx,
                                    g.x + r0 * g.elem_size, g.x_type, g.ldx, &beta, c, CUDA_R_32F,
                                    static_cast<int>(ldc), g.compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void covariance_update_cublas(at::Tensor cov, at::Tensor x, bool upper_only, int64_t block) {
  TORCH_CHECK(cov.is_cuda() && x.is_cuda(), "covariance_update_cublas: cov and x must be CUDA tensors, got ",
              cov.device(), " and ", x.device());
  TORCH_CHECK(cov.device() == x.device(), "covariance_update_cublas: cov is on ", cov.device(), " but x is on ",
              x.device());
  TORCH_CHECK(cov.scalar_type() == at::kFloat, "covariance_update_cublas: cov must be float32, got ",
              cov.scalar_type());
  TORCH_CHECK(cov.dim() == 2 && cov.size(0) == cov.size(1), "covariance_update_cublas: cov must be (d, d), got ",
              cov.sizes());
  TORCH_CHECK(cov.is_contiguous(), "covariance_update_cublas: cov must be contiguous (row-major, ld = d)");
  TORCH_CHECK(x.dim() == 2, "covariance_update_cublas: x must be (n, d), got ", x.sizes());
  const cudaDataType_t x_type = cuda_dtype(x.scalar_type());
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  TORCH_CHECK(cov.size(0) == d, "covariance_update_cublas: x has d = ", d, " but cov is ", cov.sizes());
  TORCH_CHECK(block > 0, "covariance_update_cublas: block must be positive, got ", block);
  if (n == 0 || d == 0) return;
  TORCH_CHECK(d == 1 || x.stride(1) == 1, "covariance_update_cublas: x must have unit feature stride, got strides ",
              x.strides());
  // With one row the row stride is never used; otherwise rows must not overlap (stride >= d).
  const int64_t ldx = n == 1 ? d : x.stride(0);
  TORCH_CHECK(ldx >= d, "covariance_update_cublas: x's row stride (", x.stride(0), ") must be >= d (", d,
              "); make it contiguous first");
  TORCH_CHECK(ldx <= INT_MAX && d <= INT_MAX, "covariance_update_cublas: d and x's row stride must fit in int32");
  at::assert_no_overlap(cov, x);

  const c10::cuda::CUDAGuard device_guard(cov.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasSetStream(handle, stream));
  const HandleModeGuard mode_guard(handle);

  GemmContext g;
  g.handle = handle;
  g.x_type = x_type;
  g.compute = CUBLAS_COMPUTE_32F;
  g.elem_size = static_cast<int64_t>(x.element_size());
  g.ldx = static_cast<int>(ldx);
  g.cov = cov.mutable_data_ptr<float>();
  g.d = d;

  const int64_t b = std::min(block, d);
  at::Tensor diag_tmp;
  if (upper_only) diag_tmp = at::empty({b, b}, cov.options());

  // cuBLAS takes k as int32: stream very long inputs through in chunks of tokens (beta = 1 throughout).
  constexpr int64_t kMaxTokens = INT_MAX;
  const char* x_base = static_cast<const char*>(x.const_data_ptr());
  for (int64_t t0 = 0; t0 < n; t0 += kMaxTokens) {
    g.k = static_cast<int>(std::min(kMaxTokens, n - t0));
    g.x = x_base + t0 * ldx * g.elem_size;
    if (!upper_only) {
      gemm_block(g, 0, d, 0, d, g.cov, d, 1.0f);
      continue;
    }
    for (int64_t j0 = 0; j0 < d; j0 += b) {
      const int64_t w = std::min(b, d - j0);
      if (j0 > 0) gemm_block(g, 0, j0, j0, w, g.cov + j0, d, 1.0f);  // cov[0:j0, j0:j0+w]
      float* tmp = diag_tmp.mutable_data_ptr<float>();
      gemm_block(g, j0, w, j0, w, tmp, w, 0.0f);  // tmp (w, w) = X[:, j0:j0+w]^T X[:, j0:j0+w]
      add_upper_triangle(g.cov + j0 * d + j0, d, tmp, static_cast<int>(w), stream);
    }
  }
}

}  // namespace corda
