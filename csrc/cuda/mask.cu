// CUDA C++ kernels for the word-wise mask ops (the Triton kernels are the default on CUDA;
// these are reachable with CPIFT_BACKEND=cuda and are candidates for CUDA_CPP_PREFERRED).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

namespace cpift {
namespace {

__global__ void binary_kernel(const int32_t* a, const int32_t* b, int32_t* out, int64_t n, int op) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const int32_t x = a[i], y = b[i];
    out[i] = op == 0 ? (x & y) : op == 1 ? (x | y) : op == 2 ? (x & ~y) : (x ^ y);
  }
}

__global__ void popcount_kernel(const int32_t* words, int64_t begin, int64_t end, unsigned long long* out) {
  unsigned long long local = 0;
  for (int64_t i = begin + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < end; i += int64_t(blockDim.x) * gridDim.x)
    local += __popc(static_cast<uint32_t>(words[i]));
  for (int offset = 16; offset > 0; offset /= 2) local += __shfl_down_sync(0xffffffffu, local, offset);
  if ((threadIdx.x & 31) == 0) atomicAdd(out, local);
}

void check_cuda_words(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dtype() == at::kInt && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous 1-D int32 CUDA tensor");
}

int grid_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

}  // namespace

at::Tensor mask_binary_cuda(const at::Tensor& a, const at::Tensor& b, int64_t op) {
  check_cuda_words(a, "mask_binary: a");
  check_cuda_words(b, "mask_binary: b");
  TORCH_CHECK(a.numel() == b.numel(), "mask_binary: word counts differ (", a.numel(), " vs ", b.numel(), ")");
  TORCH_CHECK(op >= 0 && op <= 3, "mask_binary: op must be 0..3, got ", op);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty_like(a);
  if (a.numel() == 0) return out;
  binary_kernel<<<grid_for(a.numel(), 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.data_ptr<int32_t>(), b.data_ptr<int32_t>(), out.data_ptr<int32_t>(), a.numel(), static_cast<int>(op));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor mask_popcount_cuda(const at::Tensor& words, const at::Tensor& offsets) {
  check_cuda_words(words, "mask_popcount: words");
  const at::Tensor offs = offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t nseg = offs.numel() - 1;
  const int64_t* o = offs.data_ptr<int64_t>();
  const c10::cuda::CUDAGuard guard(words.device());
  at::Tensor counts = at::zeros({nseg}, words.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t n = o[s + 1] - o[s];
    if (n == 0) continue;
    popcount_kernel<<<grid_for(n, 256), 256, 0, stream>>>(
        words.data_ptr<int32_t>(), o[s], o[s + 1],
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>() + s));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return counts;
}

}  // namespace cpift

// Own namespace: the CUDA key of cpift:: belongs to the Triton kernels; CPIFT_BACKEND=cuda picks these.
TORCH_LIBRARY(cpift_cuda, m) {
  m.def("mask_popcount(Tensor words, Tensor offsets) -> Tensor");
  m.def("mask_binary(Tensor a, Tensor b, int op) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpift_cuda, CUDA, m) {
  m.impl("mask_binary", &cpift::mask_binary_cuda);
  m.impl("mask_popcount", &cpift::mask_popcount_cuda);
}
