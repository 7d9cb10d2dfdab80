"""distilkit: DistilBERT-style distillation, from teacher to a smaller, faster student and a report."""

__version__ = "0.1.0"
