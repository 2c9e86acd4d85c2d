"""`inferforge bench` for language models: load generation and latency SLOs.

Modules, one concern each: workload (prompts and lengths), schedule (load modes, arrivals),
backends (in-process AsyncEngine, OpenAI-compatible HTTP), metrics (per-request definitions,
statistics, CIs, saturation), targets (SLOs and presets), runner (sending, sweep), results
(summaries, validity, exit code), output (the run's files), cli (flags and the command).
"""
