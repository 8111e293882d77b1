"""instructflow: a cached, tracked instruction fine-tuning pipeline."""

__version__ = "0.1.0"
