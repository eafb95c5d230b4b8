"""bigbatch: CLIP-style training at paper batch sizes with exact feature-cached accumulation."""

__version__ = "0.1.0"
