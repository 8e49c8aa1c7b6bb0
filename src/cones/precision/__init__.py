"""Concept neurons at float32, float16, quaternary or binary precision (paper sec. 3.2, fig. 3).

* `values`: the `TunedConcept` patch (tuned values applied to a UNet and removed bit for bit), the value
  codecs (quaternary codes, their packing, the bytes each precision costs) and the `.cones-values` file.
* `tune`: `tune_values`, which optimises the concept-implanting loss over the values of the neurons.
"""

from cones.precision.tune import TuneResult, tune_values
from cones.precision.values import (
    PRECISIONS,
    TunedConcept,
    ValuesFileError,
    load_values,
    pack_codes,
    quaternary_values,
    read_values_file_header,
    read_values_header,
    unpack_codes,
    values_bytes,
)

__all__ = [
    "PRECISIONS",
    "TuneResult",
    "TunedConcept",
    "ValuesFileError",
    "load_values",
    "pack_codes",
    "quaternary_values",
    "read_values_file_header",
    "read_values_header",
    "tune_values",
    "unpack_codes",
    "values_bytes",
]
