"""carlrar: CARL and RAR adversarial training for Hugging Face text classifiers."""

__version__ = "0.1.0"
