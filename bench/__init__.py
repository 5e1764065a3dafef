"""Side-by-side benchmarks of LoRIF against its baselines (run as `python -m bench.<name>`)."""
