"""The microbenchmarks: each op family against PyTorch's best paths, on the device there is.

``mptkernels bench`` (mptkernels.bench.run) prints the table and writes JSON and a plot;
``pytest benchmarks/ --benchmark-only`` runs the same cases under pytest-benchmark. The cases
live in the family modules (layer_norm, rotary, attention, gemm), the timing, ceilings and
output in harness, the goals the issues set in goals.
"""
