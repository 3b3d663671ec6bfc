"""Triton kernels of cpift_fast, one module per op (the C++ kernels are in csrc/).

Import these modules only through `cpift_fast._ops`, after TRITON_INTERPRET has been decided:
`triton.jit` reads that variable when a kernel is defined.
"""
