// Importance EMA (EPI): the CPU kernel of cpift::importance_ema_. The per-block math is csrc/ema.h's
// (shared with the fused AdamW + EMA step in csrc/adamw.cpp).
// Work is split over (tensor, 256-element block) pairs of all tensors at once: many small tensors
// use every core as well as one large tensor does.
#include "ema.h"

#include <algorithm>
#include <vector>

namespace cpift::CPIFT_CAP {

void importance_ema_(at::TensorList state, at::TensorList scales, at::TensorList grads, at::TensorList params,
                     double beta, int64_t signal, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, at::IntArrayRef ids) {
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;  // GradScaler's skipped step
  const ema::Consts c = ema::consts(beta, signal, grad_scale);
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(ids.empty() || static_cast<int64_t>(ids.size()) == T, "importance_ema_: ids must be empty or hold one id per "
              "tensor (", T, "), got ", ids.size());
  std::vector<at::Tensor> g(T), pc(T);
  std::vector<ema::Target> targets(T);
  std::vector<int64_t> first(T + 1, 0);  // first[i]: index of tensor i's first block in the work list
  int64_t k = 0;
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(params[i].device().is_cpu() && state[i].device().is_cpu(),
                "importance_ema_: the C++ kernel runs CPU tensors");
    g[i] = grads[i].contiguous();
    pc[i] = params[i].contiguous();
    float* sc = state[i].scalar_type() == at::kByte ? scales[k++].data_ptr<float>() : nullptr;
    targets[i] = ema::target(state[i], sc, ema::stream_of(seed, ids, i));
    first[i + 1] = first[i] + (params[i].numel() + ema::kQBlock - 1) / ema::kQBlock;
  }
  at::parallel_for(0, first[T], 64, [&](int64_t w0, int64_t w1) {
    int64_t i = std::upper_bound(first.begin(), first.end(), w0) - first.begin() - 1;
    for (int64_t w = w0; w < w1; ++i) {
      const int64_t stop = std::min(w1, first[i + 1]);
      if (stop > w) {
        const int64_t n = pc[i].numel(), b0 = w - first[i], b1 = stop - first[i];
        switch (pc[i].scalar_type()) {
          case at::kFloat:
            ema::blocks<float>(targets[i], g[i].data_ptr<float>(), pc[i].data_ptr<float>(), n, b0, b1, c);
            break;
          case at::kBFloat16:
            ema::blocks<c10::BFloat16>(targets[i], g[i].data_ptr<c10::BFloat16>(), pc[i].data_ptr<c10::BFloat16>(), n,
                                       b0, b1, c);
            break;
          default:
            ema::blocks<c10::Half>(targets[i], g[i].data_ptr<c10::Half>(), pc[i].data_ptr<c10::Half>(), n, b0, b1, c);
        }
      }
      w = std::max(w, stop);
    }
  });
}

}  // namespace cpift::CPIFT_CAP

// Schemas live in cpift_fast/ops/ (Python). The DEFAULT compile registers the CPU kernels, each calling
// the copy of the capability in use (dispatch.h).
#ifdef CPIFT_REGISTERS
CPIFT_DECLARE_CAPS(importance_ema_)
TORCH_LIBRARY_IMPL(cpift, CPU, m) { m.impl("importance_ema_", CPIFT_KERNEL(importance_ema_)); }
#endif
