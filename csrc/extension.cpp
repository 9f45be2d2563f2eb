// corda_kernels._C: the compiled backend.
//
// Always built: this file (bindings and build facts). With CUDA (see setup.py) the .cu sources add
// vendor-library paths that Triton cannot reach: cuBLAS GEMMs writing fp32 with beta = 1 straight
// into the covariance accumulator. Ops dispatch here from Python (corda_kernels/_backend.py picks the
// backend per call), so every function validates nothing the Python layer already checked, but
// TORCH_CHECKs what it relies on.
#include <torch/extension.h>

#include "ops.h"

namespace {
bool built_with_cuda() {
#ifdef CORDA_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "corda_kernels compiled backend";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA sources were compiled in");
#ifdef CORDA_WITH_CUDA
  m.def("covariance_update_cublas", &corda::covariance_update_cublas,
        "cov[upper] += x^T x on CUDA with cuBLAS (bf16/fp16/fp32 in, fp32 accumulate, beta = 1)",
        py::arg("cov"), py::arg("x"), py::arg("upper_only"), py::arg("block"));
#endif
}
