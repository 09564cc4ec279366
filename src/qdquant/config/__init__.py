"""The run's configuration: config.yaml, the sample sheet, the panel and the library.

Everything is parsed once into plain frozen dataclasses. Every bad value is
reported as an :class:`~qdquant.errors.InputError` whose one-line message
names the file, the key or row, and what is wrong.

One job per module:

- :mod:`~qdquant.config.defaults`: the schema, where every default is defined
  (:func:`default` reads one);
- :mod:`~qdquant.config.validate`: config.yaml read, merged and validated;
- :mod:`~qdquant.config.tables`: the sample sheet, the library and the panel;
- :mod:`~qdquant.config.model`: the dataclasses (:class:`Config`, ...);
- :mod:`~qdquant.config.load`: :func:`load_config`, which puts them together,
  and the image-header checks;
- :mod:`~qdquant.config.memory`: the chunk edge a step's memory allows.
"""

from qdquant.config.defaults import SCHEMA_PATH, default, schema
from qdquant.config.load import (
    check_image,
    check_results_writable,
    load_config,
    pixel_size_for,
)
from qdquant.config.memory import (
    CHUNK_MEMORY_FRACTION,
    CHUNK_QUANTUM,
    UNMIX_BYTES_PER_PX_PER_BAND,
    chunk_mem_mb,
    chunk_size_for,
)
from qdquant.config.model import (
    BINNED_SCORES,
    COMPARTMENTS,
    CONTROL_SCORES,
    ROLES,
    SCORES,
    Config,
    Dask,
    Her2,
    Library,
    PanelRow,
    Sample,
    Segmentation,
    Subtype,
    Tumour,
    Unmixing,
)
from qdquant.config.tables import read_library, read_panel, read_samples
from qdquant.config.validate import read_config_file, validate_config_dict

__all__ = [
    "BINNED_SCORES", "CHUNK_MEMORY_FRACTION", "CHUNK_QUANTUM", "COMPARTMENTS", "CONTROL_SCORES", "ROLES",
    "SCHEMA_PATH", "SCORES", "UNMIX_BYTES_PER_PX_PER_BAND", "Config", "Dask", "Her2", "Library", "PanelRow",
    "Sample", "Segmentation", "Subtype", "Tumour", "Unmixing", "check_image", "check_results_writable",
    "chunk_mem_mb", "chunk_size_for", "default", "load_config", "pixel_size_for", "read_config_file",
    "read_library", "read_panel", "read_samples", "schema", "validate_config_dict",
]
