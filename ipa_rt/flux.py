"""``from ipa_rt.flux import <diffusers' pipeline name>``: the public path of :mod:`ipa_rt.families.flux`."""

from .families.flux import FAMILY, __all__  # noqa: F401

__getattr__ = FAMILY.module_getattr
