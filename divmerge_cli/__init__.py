"""divmerge: merge fine-tuned language models that share one base."""

__version__ = "0.1.0"
