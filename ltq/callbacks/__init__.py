"""Lightning callbacks for scheduled quantization work."""

from ltq.callbacks.guards import NumericalError, NumericalGuard
from ltq.callbacks.requantize import Requantize, requantize_model
from ltq.callbacks.stats import QuantStats

__all__ = ["NumericalError", "NumericalGuard", "QuantStats", "Requantize", "requantize_model"]
