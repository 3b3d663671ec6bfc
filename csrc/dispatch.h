// CPU capabilities: every kernel source (csrc/<op>.cpp) is compiled once per capability, and the
// op's registered CPU kernel calls the copy of the capability in use.
//
// - DEFAULT: baseline x86-64 / aarch64 (NEON is baseline there), compiled as part of the extension;
//   this compile also registers the op (CPIFT_REGISTERS).
// - AVX2, AVX512 (x86-64 only): extra objects built with -DCPIFT_CAP=<name> and that capability's
//   -m flags (cpift_fast/_extension.py, CAPABILITY_FLAGS).
// Each compile puts its kernels in namespace cpift::<CPIFT_CAP> and ATen's vector types in
// at::vec::<CPIFT_CAP>, so the copies never collide. The extension's own objects are linked before
// the extra ones: where an inline function of a header is emitted by several compiles, the baseline
// copy is the one kept.
#pragma once

#ifndef CPIFT_CAP
#define CPIFT_CAP DEFAULT
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define CPIFT_REGISTERS 1
#endif

#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#define CPIFT_X86 1
#endif

namespace cpift {

// Index of the capability in use (DEFAULT 0, AVX2 1, AVX512 2): the best compiled one that this CPU
// supports and torch's at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY) allows, unless
// set_capability chose another (dispatch.cpp).
int capability_index();

template <typename Fn>
struct Dispatch;

template <typename R, typename... A>
struct Dispatch<R(A...)> {
  // Kernels: the copies of one kernel, in capability order (DEFAULT first).
  template <R (*... Kernels)(A...)>
  static R call(A... args) {
    constexpr R (*table[])(A...) = {Kernels...};
    return table[capability_index()](std::forward<A>(args)...);
  }
};

}  // namespace cpift

// In the registering compile: CPIFT_DECLARE_CAPS(name) declares the other compiled capabilities'
// copies of cpift::DEFAULT::name (defined by their compiles); CPIFT_KERNEL(name) is the kernel to
// register. -DCPIFT_WITH_AVX2 / -DCPIFT_WITH_AVX512 (cpift_fast/_extension.py) say which copies were
// compiled; a table slot of a capability not compiled holds DEFAULT's copy and is never chosen.
#ifdef CPIFT_WITH_AVX2
#define CPIFT_DECLARE_AVX2(name) namespace cpift::AVX2 { decltype(::cpift::DEFAULT::name) name; }
#define CPIFT_AVX2_COPY(name) &::cpift::AVX2::name
#else
#define CPIFT_DECLARE_AVX2(name)
#define CPIFT_AVX2_COPY(name) &::cpift::DEFAULT::name
#endif
#ifdef CPIFT_WITH_AVX512
#define CPIFT_DECLARE_AVX512(name) namespace cpift::AVX512 { decltype(::cpift::DEFAULT::name) name; }
#define CPIFT_AVX512_COPY(name) &::cpift::AVX512::name
#else
#define CPIFT_DECLARE_AVX512(name)
#define CPIFT_AVX512_COPY(name) &::cpift::DEFAULT::name
#endif
#define CPIFT_DECLARE_CAPS(name) CPIFT_DECLARE_AVX2(name) CPIFT_DECLARE_AVX512(name)
#define CPIFT_KERNEL(name)                                                                        \
  (&::cpift::Dispatch<decltype(::cpift::DEFAULT::name)>::call<&::cpift::DEFAULT::name, CPIFT_AVX2_COPY(name), \
                                                              CPIFT_AVX512_COPY(name)>)
