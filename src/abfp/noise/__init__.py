"""Noise models of dynamic-precision analog computing (SPEC section 5).

Shot, thermal and weight noise, each driven by an energy per MAC ``E`` (per layer or per
output channel), zero-mean Gaussian, redrawn every forward pass and reproducible with a seed.
They act on the float32 products of a converted model (not on the ABFP ADC):

* :mod:`abfp.noise.formulas`: the standard deviations and ``b_eff`` as plain functions;
* :class:`ShotNoise`, :class:`ThermalNoise`, :class:`WeightNoise`, :class:`NoiseStack`: the
  composable models; :func:`make_noise` builds them from names (``"shot+thermal"``);
* :class:`NoiseInjector`: installs a model on every product of a model, with energies;
* :func:`device_config`, :class:`RepeatAverage`: the ABFP device's own noise under repeats.
"""

from .device import RepeatAverage, device_config, device_config_for_energy, repeat_overrides
from .formulas import averaged_std, effective_bits, shot_sigma, tensor_range, thermal_sigma, weight_sigma
from .injector import NoiseInjector, SiteProfile
from .models import NOISE_NAMES, NoiseModel, NoiseStack, ShotNoise, ThermalNoise, WeightNoise, apply_noise, make_noise
from .product import ProductView

__all__ = [
    "NOISE_NAMES",
    "NoiseInjector",
    "NoiseModel",
    "NoiseStack",
    "ProductView",
    "RepeatAverage",
    "ShotNoise",
    "SiteProfile",
    "ThermalNoise",
    "WeightNoise",
    "apply_noise",
    "averaged_std",
    "device_config",
    "device_config_for_energy",
    "effective_bits",
    "make_noise",
    "repeat_overrides",
    "shot_sigma",
    "tensor_range",
    "thermal_sigma",
    "weight_sigma",
]
