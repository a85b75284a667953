"""``from ipa_rt.kolors import <diffusers' pipeline name>``: the public path of :mod:`ipa_rt.families.kolors`."""

from .families.kolors import FAMILY, __all__  # noqa: F401

__getattr__ = FAMILY.module_getattr
