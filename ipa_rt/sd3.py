"""``from ipa_rt.sd3 import <diffusers' pipeline name>``: the public path of :mod:`ipa_rt.families.sd3`."""

from .families.sd3 import FAMILY, __all__  # noqa: F401

__getattr__ = FAMILY.module_getattr
