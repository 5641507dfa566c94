"""carlrar: CARL and RAR adversarial training for Hugging Face text classifiers."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: ``import carlrar`` stays light; the Trainer (and transformers) load on first use
    if name == "AdversarialTrainer":
        from carlrar.hf_trainer import AdversarialTrainer

        return AdversarialTrainer
    raise AttributeError(f"module 'carlrar' has no attribute {name!r}")
