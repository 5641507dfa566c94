"""The paper's objective terms, each owning its machinery, each citing its equations: CARL's contrastive term
(``contrastive.py``: Eq. 2–6) and RAR's reconstruction term (``reconstruction.py``: Eq. 7). L_C (Eq. 8) is the
cross-entropy every step computes itself."""

from carlrar.objectives.contrastive import (ContrastiveConfig, ContrastiveLoss, ContrastiveTerm, MemoryBank,
                                            NegativeSampler, Projection)
from carlrar.objectives.reconstruction import (ReconstructionConfig, ReconstructionTerm, Reconstructor,
                                               attach_reconstructor, load_mlm_head, reconstruction_loss)
from carlrar.objectives.term import ObjectiveTerm, TermLoss

__all__ = ["ContrastiveConfig", "ContrastiveLoss", "ContrastiveTerm", "MemoryBank", "NegativeSampler", "Projection",
           "ReconstructionConfig", "ReconstructionTerm", "Reconstructor", "attach_reconstructor", "load_mlm_head",
           "reconstruction_loss", "ObjectiveTerm", "TermLoss"]
