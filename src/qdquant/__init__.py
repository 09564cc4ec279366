"""qdquant: quantify multiplexed quantum-dot immunofluorescence in cancer tissue."""

from qdquant.errors import InputError, QdquantError

__version__ = "0.1.0"

__all__ = ["InputError", "QdquantError", "__version__"]
