"""Evaluation tooling, apart from the library: presets of published U-Nets, the sampling loop and timers,
the trained digits model, quality metrics, feature-similarity analysis, benchmarks, the demo and the CLI.

Import rule (tested): this package may import the library (`deepcache_compile.*`); the library never imports it.
"""
