"""posttrain: LLM post-training methods in plain, readable PyTorch, each demonstrated for real."""

__version__ = "0.1.0"
