"""torch computes with NaN, Inf and empty tensors by IEEE rules and without a word; NumPy warns
("invalid value encountered in subtract", "overflow encountered in exp", "divide by zero"). The
reference entry points are decorated with :func:`silent`, so that the NumPy backend is as quiet
as torch. Only the warnings go: the values are IEEE's either way."""
import functools

import numpy as np


def silent(fn):
    """Run fn with NumPy's floating-point warnings off."""
    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return quiet
