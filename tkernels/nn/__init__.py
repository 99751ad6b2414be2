"""Drop-in twins of ``torch.nn`` modules. Each subclasses its torch class, so isinstance,
state_dict keys, initialisation and repr stay those of torch."""
from .activation import GELU, LeakyReLU, ReLU, SiLU, Sigmoid, Tanh
from .linear import Linear

__all__ = ["Linear", "ReLU", "LeakyReLU", "GELU", "SiLU", "Sigmoid", "Tanh"]
