"""napari reader: a sample's results folder or a bare ``unmixed.ome.zarr``.

napari asks :func:`napari_get_reader` about every path it opens: importing
this module costs a few standard-library imports, nothing more.
"""

from __future__ import annotations

from qdquant.viewer.results import locate

__all__ = ["napari_get_reader", "read_results"]


def napari_get_reader(path):
    """The reader for ``path`` when it is qdquant's results, else None (at once)."""
    return read_results if locate(path) is not None else None


def read_results(path) -> list[tuple]:
    """Layer data of a sample's results (see :func:`qdquant.viewer.layers.results_layers`)."""
    from qdquant.viewer.layers import results_layers  # dask and zarr: only once a path is ours

    return results_layers(locate(path))
