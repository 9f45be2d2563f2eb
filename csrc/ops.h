#pragma once
// Kept light (no torch/extension.h, no Python headers) so the .cu sources compile quickly with nvcc.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace corda {
#ifdef CORDA_WITH_CUDA
// cov += x^T x on the GPU with cuBLAS (csrc/covariance_cuda.cu).
//
// cov: (d, d) float32, contiguous, CUDA. x: (n, d) bfloat16/float16/float32 on the same device, with
// stride(1) == 1 and any row stride >= d (read in place: no fp32 copy is made). Products are
// accumulated in fp32 (CUBLAS_COMPUTE_32F) and added to cov with beta = 1 on the current stream, using
// torch's cuBLAS handle. fp32 inputs never use TF32.
//
// upper_only: only entries with i <= j are updated (the strict lower triangle is left untouched, as
// in the reference); the triangle is built column block by column block of width `block`, the
// off-diagonal part straight into cov and each diagonal block through a (block, block) fp32
// temporary. Otherwise one GEMM updates the full square. n == 0 or d == 0 is a no-op.
void covariance_update_cublas(at::Tensor cov, at::Tensor x, bool upper_only, int64_t block);
#endif
}  // namespace corda
