"""NumPy references, computed in float64.

This tree mirrors :mod:`tkernels.ops` file for file and shares no code with it:
it imports neither torch nor triton, so a bug in a kernel cannot hide in a
helper that the reference also uses. Every function takes and returns NumPy
arrays; casting to and from torch dtypes is the caller's job.
"""
