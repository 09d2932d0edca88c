"""Executing a plan: loading models, reading images, the resumable journal, captioning in-process
or in worker replicas, dry runs on random weights, and the results table."""
