"""All of qdquant's file reading and writing.

Images are read lazily (tifffile's zarr store wrapped in dask) so a whole slide
never has to fit in memory; outputs are written atomically (to a temporary
sibling, renamed when complete) so a failed step leaves nothing half-written.

One job per module:

- :mod:`~qdquant.io.ome_tiff`: multispectral cubes read from (OME-)TIFF and
  QPTIFF files (:func:`open_cube`, :func:`read_cube_header`) and written as
  OME-TIFF (:func:`write_ome_tiff`);
- :mod:`~qdquant.io.ome_zarr`: the unmixed image as an OME-Zarr multiscale
  (:func:`write_ome_zarr`, :func:`read_ome_zarr`, the pyramid's levels);
- :mod:`~qdquant.io.labels`: label images inside that store;
- :mod:`~qdquant.io.tables`: CSV tables and ``cells.h5ad``;
- :mod:`~qdquant.io.atomic`: atomic outputs and scratch folders.
"""

from qdquant.io.atomic import atomic_path, on_distributed_cluster, scratch_dir
from qdquant.io.labels import read_labels, write_labels
from qdquant.io.ome_tiff import BIGTIFF_BYTES, Cube, decoded_once, open_cube, read_cube_header, write_ome_tiff
from qdquant.io.ome_zarr import (
    PYRAMID_COARSEST_PX,
    STORE_CHUNK_PX,
    pyramid_factors,
    read_multiscale,
    read_ome_zarr,
    read_pixel_size_um,
    read_window,
    store_chunk,
    write_ome_zarr,
)
from qdquant.io.tables import H5adWriter, read_csv, write_csv, write_csv_slices

__all__ = [
    "BIGTIFF_BYTES", "PYRAMID_COARSEST_PX", "STORE_CHUNK_PX", "Cube", "H5adWriter",
    "atomic_path", "decoded_once", "on_distributed_cluster", "open_cube", "pyramid_factors", "read_csv",
    "read_cube_header", "read_labels", "read_multiscale", "read_ome_zarr", "read_pixel_size_um", "read_window",
    "scratch_dir",
    "store_chunk", "write_csv", "write_csv_slices", "write_labels", "write_ome_tiff", "write_ome_zarr",
]
