"""Every case of every family as pytest-benchmark tests (see conftest.py for the options)."""


def test_case(benchmark, bench_impl, bench_fn):
    case, name = bench_impl
    role, fn = bench_fn
    fn()  # warm-up: allocation, any compilation, outside the timing
    benchmark.extra_info.update(family=case.family, case=case.name, role=role,
                                nbytes=case.nbytes, flops=case.flops, unit="TOP" if case.int8 else None)
    benchmark(fn)
