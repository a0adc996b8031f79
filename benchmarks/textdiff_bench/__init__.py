"""Benchmarks and research tooling: separate commands that print tables and write plots. The product (model, training,
app) never imports this package."""
