"""The time of one call, as every end-to-end bench takes it: on CUDA the median of many repeats
after warm-up (``triton.testing.do_bench``, which clears the L2 between repeats); on the CPU (a
smoke run that checks a script's logic) the median of five calls after one."""

from __future__ import annotations

import time


def median_us(fn, cuda: bool, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    if not cuda:
        fn()
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
        return sorted(samples)[2]
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3
