"""The config schema, and the contract's defaults it defines.

Every default of config.yaml (a HER2 threshold, the number of sectors, the
chunk edge, ...) is defined once, in ``schemas/config.schema.yaml`` (shipped
as package data). The config takes them from there when it fills in a
config file, and the stage functions take their keyword defaults from it
with :func:`default`, so that a function called by hand and a workflow run
with the default config agree.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path

import yaml

#: Where the schema lies (the Snakefile validates the config against it too).
SCHEMA_PATH = Path(str(resources.files("qdquant").joinpath("schemas/config.schema.yaml")))


@functools.cache
def _parsed_schema() -> dict:
    return yaml.safe_load(resources.files("qdquant").joinpath("schemas/config.schema.yaml").read_text())


def schema() -> dict:
    """The JSON schema of config.yaml (a copy: the caller may change it)."""
    return copy.deepcopy(_parsed_schema())


def default(key: str):
    """The schema's default of a config key, named with dots.

    Examples
    --------
    >>> default("her2.sectors")
    36
    >>> default("segmentation.nucleus_diameter_um")
    'auto'
    """
    node = _parsed_schema()
    for part in key.split("."):
        node = node["properties"][part]
    return copy.deepcopy(node["default"])
