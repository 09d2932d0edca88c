"""Instruments that the run layer switches on: the memory sampler, the profiler's forward hooks,
the Profile they produce, merging of replica profiles, and pictures of one profile."""
