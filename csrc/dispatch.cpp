// The CPU capability in use (csrc/dispatch.h), and the ops that show and choose it:
// torch.ops.cpift_cpu.capability(), compiled_capabilities(), supported_capabilities(),
// set_capability(name) (names: "default", "avx2", "avx512").
#include "dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <string>
#include <vector>

namespace cpift {
namespace {

constexpr const char* kNames[] = {"default", "avx2", "avx512"};
constexpr int kCount = 3;
// Which capabilities' kernels this build holds (-DCPIFT_WITH_<CAP>, cpift_fast/_extension.py).
constexpr bool kCompiled[kCount] = {
    true,
#ifdef CPIFT_WITH_AVX2
    true,
#else
    false,
#endif
#ifdef CPIFT_WITH_AVX512
    true,
#else
    false,
#endif
};

// What capability `cap` needs of the CPU: the instructions its compile may use (-m flags in
// cpift_fast/_extension.py). __builtin_cpu_supports also checks that the OS saves the vector state.
bool cpu_supports(int cap) {
#ifdef CPIFT_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return cap == 0 || (cap == 1 && avx2) || (cap == 2 && avx512);
#else
  return cap == 0;
#endif
}

int torch_choice() {
  const std::string s = at::get_cpu_capability();
  if (s == "AVX512") return 2;
  if (s == "AVX2") return 1;
  return 0;
}

int automatic() {
  const int cap = torch_choice();
  int best = 0;
  for (int c = 1; c <= cap; ++c)
    if (kCompiled[c] && cpu_supports(c)) best = c;
  return best;
}

std::atomic<int> g_chosen{-1};

std::vector<std::string> names(bool supported_only) {
  std::vector<std::string> out;
  for (int c = 0; c < kCount; ++c)
    if (kCompiled[c] && (!supported_only || cpu_supports(c))) out.emplace_back(kNames[c]);
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string capability() { return kNames[capability_index()]; }

std::vector<std::string> compiled_capabilities() { return names(false); }

std::vector<std::string> supported_capabilities() { return names(true); }

void set_capability(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
  const auto end = kNames + kCount;
  const int cap = static_cast<int>(std::find(kNames, end, name) - kNames);
  TORCH_CHECK(cap < kCount && kCompiled[cap], "set_capability: '", name,
              "' is not a compiled CPU capability; compiled: ", joined(compiled_capabilities()));
  TORCH_CHECK(cpu_supports(cap), "set_capability: this CPU does not support '", name,
              "' (it lacks some of the instructions that capability is compiled for); supported here: ",
              joined(supported_capabilities()));
  g_chosen.store(cap);
}

}  // namespace

int capability_index() {
  int c = g_chosen.load(std::memory_order_relaxed);
  if (c < 0) {
    c = automatic();
    g_chosen.store(c, std::memory_order_relaxed);
  }
  return c;
}

}  // namespace cpift

TORCH_LIBRARY(cpift_cpu, m) {
  m.def("capability() -> str", &cpift::capability);
  m.def("compiled_capabilities() -> str[]", &cpift::compiled_capabilities);
  m.def("supported_capabilities() -> str[]", &cpift::supported_capabilities);
  m.def("set_capability(str name) -> ()", &cpift::set_capability);
}
