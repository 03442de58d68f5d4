"""driftscope: base-vs-tuned LLM drift in lockstep, exact full-vocabulary metrics without materializing logits."""
__version__ = "0.1.0"
