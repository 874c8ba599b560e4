"""Fast kernels, installed as ``mosbits.backends``. Each backend is a module registered in `mosbits.dispatch`;
importing this package imports none of them."""

from mosbits.dispatch import available

__all__ = ["available"]
