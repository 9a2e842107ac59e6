"""Quantization methods, each a LightningModule over the shared :class:`Classifier`.

``METHODS`` maps short names to classes; the CLI also accepts the class name
(``--model TTQ``) or the full class path (``ltq.methods.TTQ``).
"""

from ltq.methods.base import Classifier
from ltq.methods.apot import APoT
from ltq.methods.metaquant import MetaQuant
from ltq.methods.ptq import PTQ
from ltq.methods.qat import QAT
from ltq.methods.ttq import TTQ

METHODS = {"fp": Classifier, "ptq": PTQ, "qat": QAT, "ttq": TTQ, "apot": APoT, "metaquant": MetaQuant}

__all__ = ["Classifier", "PTQ", "QAT", "TTQ", "APoT", "MetaQuant", "METHODS"]
