"""kdtrack's performance suite: every figure is a ratio of variants timed in one process run, interleaved.

Run `python -m benchmarks` (CPU, a few minutes), `python -m benchmarks --quick` (a smoke check in seconds) or
`python -m benchmarks --device cuda --scale large`. Each benchmark module has one `run(settings) -> Result`.
"""
