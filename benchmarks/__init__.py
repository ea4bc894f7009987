"""qcast benchmarks: latency, size and fidelity against fp32 and peer int8 engines (see run.py)."""
