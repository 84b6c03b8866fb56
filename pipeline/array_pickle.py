"""Reading pickles that the bottom-up-attention tools write (airsplay's weight .pkl, MILVLG's npz `info`)
without letting a file run code: only numpy arrays, dicts and plain values may be built."""

from __future__ import annotations

import pickle
from typing import BinaryIO


class ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, scalars, dicts and plain values only; anything else is an UnpicklingError."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, not only to arrays")
        return super().find_class(module, name)


def load_arrays(file: BinaryIO):
    """One pickled object (latin1 for Python 2 pickles of numpy arrays, as Detectron's are)."""
    return ArrayUnpickler(file, encoding="latin1").load()
