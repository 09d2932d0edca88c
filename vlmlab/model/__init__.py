"""What a model is, read from the model: its spec (config, module tree on the meta device, roles),
the offline catalogue, family overrides, the memory model and dummy inputs for dry runs."""
