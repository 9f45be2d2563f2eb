#pragma once
#include <torch/extension.h>

namespace corda {
#ifdef CORDA_WITH_CUDA
// cov: (d, d) fp32 CUDA; x: (n, d) bf16/fp16/fp32 CUDA with stride(1) == 1.
// Adds x^T x into cov. upper_only: only blocks on or above the diagonal are computed and the strict
// lower triangle is left untouched; block: column-block width of the triangle decomposition.
void covariance_update_cublas(torch::Tensor cov, torch::Tensor x, bool upper_only, int64_t block);
#endif
}  // namespace corda
