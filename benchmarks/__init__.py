"""vedrt's benchmark harness: `python -m benchmarks` or `vedrt bench` (see `benchmarks.__main__`)."""
