"""torch computes with NaN, Inf and empty tensors by IEEE rules and without a word; NumPy warns
("invalid value encountered in subtract", "overflow encountered in exp", "divide by zero"). The
reference entry points are decorated with :func:`silent`, so that the NumPy backend is as quiet
as torch. Only the warnings go: the values are IEEE's either way."""
import functools
import threading

import numpy as np


class _Region(threading.local):
    """Per thread: whether a silent call is running (its warnings are off already)."""
    active = False


_region = _Region()


def silent(fn):
    """Run fn with NumPy's floating-point warnings off. A silent call inside another one runs as it
    is: entering np.errstate costs about a microsecond, which small inputs notice."""
    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        if _region.active:
            return fn(*args, **kwargs)
        with np.errstate(all="ignore"):
            _region.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                _region.active = False

    return quiet
