"""Triton kernels of cpift_fast, installed as `cpift_fast.kernels`.

Import these modules only through `cpift_fast._ops`, after TRITON_INTERPRET has been decided:
`triton.jit` reads that variable when a kernel is defined.
"""
