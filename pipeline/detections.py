"""Per-box object and attribute predictions: what the butd-vg detector returns per kept box, and how the
interchange formats name them (LXMERT's TSV fields, the keys of MILVLG's npz `info`). Free of torch, so
the importers and `userpipe export` load fast."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# interchange name -> (Detections field, dtype in the files: LXMERT's load_obj_tsv and MILVLG's np.argmax)
DETECTION_FIELDS = {
    "objects_id": ("object_id", np.dtype(np.int64)),
    "objects_conf": ("object_conf", np.dtype(np.float32)),
    "attrs_id": ("attribute_id", np.dtype(np.int64)),
    "attrs_conf": ("attribute_conf", np.dtype(np.float32)),
}
INT16_MAX = np.iinfo(np.int16).max


@dataclass
class Detections:
    """Per kept box: its most likely object class and attribute (0-based indices into Visual Genome's
    1,600 objects and 400 attributes, background and "no attribute" excluded) and their probabilities."""

    object_id: np.ndarray  # (k,) int16
    object_conf: np.ndarray  # (k,) float32
    attribute_id: np.ndarray  # (k,) int16
    attribute_conf: np.ndarray  # (k,) float32

    def first(self, k: int) -> Detections:
        return Detections(
            self.object_id[:k], self.object_conf[:k], self.attribute_id[:k], self.attribute_conf[:k]
        )

    @classmethod
    def from_fields(cls, fields: dict, n: int) -> Detections:
        """The interchange fields of n boxes (ValueError unless each is a 1-D numeric array of n values;
        checked before anything is converted, so an odd value cannot make this slow)."""
        values = {}
        for name, (attribute, _) in DETECTION_FIELDS.items():
            array = fields[name]
            if not isinstance(array, np.ndarray) or array.shape != (n,) or array.dtype.kind not in "iuf":
                shape = getattr(array, "shape", None)
                raise ValueError(f"{name} is not {n} numbers ({type(array).__name__} {shape or ''})".strip())
            if attribute.endswith("_id"):
                if array.dtype.kind == "f" or (n and (array.min() < 0 or array.max() > INT16_MAX)):
                    raise ValueError(f"{name} holds values that are not class indices")
                values[attribute] = array.astype(np.int16)
            else:
                values[attribute] = array.astype(np.float32)
        return cls(**values)
