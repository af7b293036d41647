"""Speed and memory measurements against cellpose, run from a checkout (not part of the installed packages).

    python -m benchmarks.bench_dynamics   # flow algebra: masks -> flows, flows -> masks
    make bench                            # the six main ones, one after the other

Each module's docstring says what it measures and its options; results go to stdout or the files it names.
"""
