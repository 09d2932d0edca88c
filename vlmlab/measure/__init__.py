"""Comparing runs: ``bench`` (strategies and batch sizes side by side), ``profile`` (one measured
run) and the plots that compare them. Uses the run layer; nothing below imports from here."""
