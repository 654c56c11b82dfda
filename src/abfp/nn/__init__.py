"""Converting PyTorch models to run on the device."""

from .convert import analog_state, calibrate, convert, digital, is_converted, reseed, set_config, to_digital
from .summary import Summary, summary

__all__ = ["analog_state", "calibrate", "convert", "digital", "is_converted", "reseed", "set_config", "summary", "Summary", "to_digital"]
