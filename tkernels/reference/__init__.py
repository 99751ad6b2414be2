"""NumPy references, computed in float64 (linear and conv2d take a ``compute_dtype``: the NumPy
backend runs float32 tensors' matrix products in float32; float64 is the default, and the oracle).

This tree mirrors :mod:`tkernels.ops` file for file and shares no code with it:
it imports neither torch nor triton, so a bug in a kernel cannot hide in a
helper that the reference also uses. Every function takes and returns NumPy
arrays; casting to and from torch dtypes is the caller's job.
"""
