// Shared helpers for the cpift CPU kernels.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstdint>

namespace cpift {

// Grain for at::parallel_for over words or elements: large enough to amortise thread wake-up.
constexpr int64_t kGrain = 1 << 15;

inline uint32_t as_u32(int32_t w) { return static_cast<uint32_t>(w); }

inline void check_words(const at::Tensor& words, const char* name) {
  TORCH_CHECK(words.dtype() == at::kInt, name, " must be int32 mask words, got ", words.dtype());
  TORCH_CHECK(words.dim() == 1, name, " must be 1-D, got shape ", words.sizes());
  TORCH_CHECK(words.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(words.device().is_cpu(), name, " must be a CPU tensor for the C++ kernel");
}

}  // namespace cpift
