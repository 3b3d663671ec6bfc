"""The benchmark suite: one module per op (bench_<op>.py) and the shared harness."""
