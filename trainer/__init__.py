"""webmcse trainer: MCSE sentence embeddings with Accelerate + DeepSpeed, tracked in MLflow."""

__version__ = "0.1.0"
