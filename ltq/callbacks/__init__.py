"""Lightning callbacks for scheduled quantization work."""

from ltq.callbacks.requantize import Requantize, requantize_model
from ltq.callbacks.stats import QuantStats

__all__ = ["QuantStats", "Requantize", "requantize_model"]
