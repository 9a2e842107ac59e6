"""Quantization methods, each a LightningModule over the shared :class:`Classifier`.

``METHODS`` maps short names to classes; the CLI also accepts the class name
(``--model TTQ``) or the full class path (``ltq.methods.TTQ``).
"""

from ltq.methods.base import Classifier

METHODS = {"fp": Classifier}

__all__ = ["Classifier", "METHODS"]
