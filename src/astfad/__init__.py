"""astfad: few-shot industrial visual anomaly detection."""

__version__ = "0.1.0"

from astfad.detector import Detector, Prediction, load  # noqa: E402  (the version first: detector reads it)

__all__ = ["Detector", "Prediction", "load", "__version__"]
