"""A stand-in for ``flair``, which TextAttack 0.3.11 imports at import time but uses only for part-of-speech and
named-entity tags.

The real flair needs transformers < 5, which carlrar cannot use. The recipes carlrar runs (DeepWordBug, Pruthi,
PWWS) never ask for a tag, so nothing of flair's is called: this module provides the few names TextAttack touches
on import (``flair.device``, ``flair.data.Sentence``, ``flair.data.Tokenizer``, ``flair.models.SequenceTagger``),
and any use of them raises, so a recipe that does need tags fails loudly instead of running differently. With the
real flair installed, it is used and this module does nothing. (Checked here against a separate environment with
the real flair 0.15.1: the same per-example results on 200 SST-2 dev examples.)
"""

from __future__ import annotations

import importlib.util
import sys
import types


class FlairStandInUsed(RuntimeError):
    """A recipe asked flair for tags; the stand-in has none."""


def _refuse(*_, **__):
    raise FlairStandInUsed("this TextAttack recipe needs flair's part-of-speech/NER tagger, which carlrar stands in "
                           "for (flair needs transformers < 5): use DeepWordBug, Pruthi or PWWS")


class Sentence:
    __init__ = _refuse


class Tokenizer:
    """A base class TextAttack subclasses at import (TextAttackFlairTokenizer); subclassing is harmless."""


class SequenceTagger:
    load = staticmethod(_refuse)
    __init__ = _refuse


def install() -> bool:
    """Put the stand-in in ``sys.modules`` unless flair is importable; True when the stand-in is in use."""
    if "flair" in sys.modules:
        return getattr(sys.modules["flair"], "CARLRAR_STAND_IN", False)
    if importlib.util.find_spec("flair") is not None:
        return False
    flair, data, models = (types.ModuleType(n) for n in ("flair", "flair.data", "flair.models"))
    flair.CARLRAR_STAND_IN = True
    flair.device = None  # TextAttack assigns its torch device here
    data.Sentence, data.Tokenizer, models.SequenceTagger = Sentence, Tokenizer, SequenceTagger
    flair.data, flair.models = data, models
    sys.modules.update({"flair": flair, "flair.data": data, "flair.models": models})
    return True
