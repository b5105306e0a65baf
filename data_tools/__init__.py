"""webmcse data tools: noisy image-text pairs and text corpora -> verified WebDataset shards."""

__version__ = "0.1.0"
