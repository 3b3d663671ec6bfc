#!/usr/bin/env python3
"""Controlled AdamW measurements behind docs/cpu-capabilities.md (the `cpift bench` records are medians
of interleaved rounds; these are minimums over repeats, which other load on a shared machine inflates
least).

    ATEN_CPU_CAPABILITY=avx2 T=2 python tools/adamw_min_time.py          # one capability, T threads
    python tools/adamw_min_time.py --many                                # 500 x 4096 vs 1 x 2,048,000

Default: one 2^21-element tensor, MaskedAdamW (cpift's kernels at torch's capability, which
ATEN_CPU_CAPABILITY caps) against torch.optim.AdamW(fused=True), fp32 and bf16, for no mask and
masks 1 % / 50 % / 99 % random and 50 % contiguous: nanoseconds per element, min over 30 steps.
--many: the masked_adamw_ op and torch._fused_adamw_ called directly (no optimizer Python), fp32,
1 % frozen: 500 tensors of 4096 elements against one tensor of the same total size.
"""

import argparse
import os
import time

import torch

from cpift_fast import MaskedAdamW, ParamMask, ops


def best_ns_per_element(step, n, repeats=30):
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times) * 1e9 / n


def one_tensor():
    n = 1 << 21
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter((torch.randn(n, generator=g) * 0.02).to(dtype))
        p.grad = (torch.randn(n, generator=g) * 1e-3).to(dtype)
        anchor = best_ns_per_element(torch.optim.AdamW([p], lr=1e-4, fused=True).step, n)
        cells = []
        for fraction, layout in ((0.0, "none"), (0.01, "random"), (0.5, "random"), (0.99, "random"),
                                 (0.5, "contiguous")):
            bits = torch.rand(n, generator=g) < fraction if layout == "random" else torch.arange(n) < fraction * n
            opt = MaskedAdamW([("w", p)], lr=1e-4, frozen=ParamMask.from_bool({"w": bits}))
            ours = best_ns_per_element(opt.step, n)
            cells.append(f"{fraction:.0%} {layout} {ours:.2f} ({ours / anchor:.2f}x)")
        print(f"{str(dtype)[6:]}: torch fused {anchor:.2f} ns/element | MaskedAdamW: " + " | ".join(cells), flush=True)


def many_tensors():
    g = torch.Generator().manual_seed(0)
    for sizes in ([4096] * 500, [500 * 4096]):
        p = [torch.randn(n, generator=g) for n in sizes]
        grads = [torch.randn(n, generator=g) * 1e-3 for n in sizes]
        m, v = [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]
        words = [ops.mask_pack(torch.rand(n, generator=g) < 0.01) for n in sizes]
        steps, step_list = torch.ones(len(sizes)), [torch.tensor(1.0) for _ in sizes]
        lr = torch.tensor(1e-3, dtype=torch.float64)
        n = sum(sizes)
        ours = best_ns_per_element(lambda: torch.ops.cpift.masked_adamw_(
            p, grads, m, v, [], words, steps, lr, 0.9, 0.99, 0.01, 1e-8, False, False, None, None), n)
        anchor = best_ns_per_element(lambda: torch._fused_adamw_(
            p, grads, m, v, [], step_list, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8,
            amsgrad=False, maximize=False), n)
        print(f"{len(sizes)} x {sizes[0]}: masked_adamw_ {ours:.2f} ns/element, torch._fused_adamw_ {anchor:.2f}",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", action="store_true", help="500 x 4096 vs 1 x 2,048,000 elements")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("T", torch.get_num_threads())))
    print(f"torch {torch.backends.cpu.get_cpu_capability()}, cpift_fast {torch.ops.cpift_cpu.capability()}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}", flush=True)
    many_tensors() if args.many else one_tensor()
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
