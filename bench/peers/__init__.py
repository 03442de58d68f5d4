"""The real-weights peer benchmark: driftscope against transformers, llama.cpp and lm-eval on the same work.

Run from the repository root: `python -m bench.peers.run --help`. Results are recorded in bench/RESULTS.md.
"""
