"""A few windows of a slide's pixels, read without touching the rest: what the unmix step
fits its corrections, its library and its noise model on."""

from __future__ import annotations

import dask.array as da
import numpy as np

from qdquant import io, unmixing


def pixel_sample(*arrays: da.Array, n_blocks: int = 4, window: int = 384,
                  max_pixels: int | None = None, grid=None) -> list[np.ndarray]:
    """The same windows of a few evenly spaced chunks of lazy (..., Y, X) arrays, side by side along X.

    Enough pixels to fit a handful of parameters on (``n_blocks`` windows of
    at most ``window``² pixels, centred in their chunks), read without
    touching the rest of the slide. Chunks are those of ``grid`` (dask's
    (Y, X) chunk tuples; default the first array's). With ``max_pixels``,
    each window is strided (the same stride along Y and X) to keep at most
    about that many pixels in all.
    """
    ys, xs = grid if grid is not None else arrays[0].chunks[-2:]
    y_edges, x_edges = np.cumsum((0,) + ys), np.cumsum((0,) + xs)
    picks = np.unique(np.linspace(0, len(ys) * len(xs) - 1, min(n_blocks, len(ys) * len(xs))).round().astype(int))
    height = min(min(ys[p // len(xs)] for p in picks), window)
    windows = []
    for p in picks:
        by, bx = p // len(xs), p % len(xs)
        width = min(xs[bx], window)
        windows.append((y_edges[by] + (ys[by] - height) // 2, x_edges[bx] + (xs[bx] - width) // 2, width))
    total = height * sum(w for _, _, w in windows)
    stride = 1 if max_pixels is None else max(1, int(np.ceil(np.sqrt(total / max_pixels))))
    parts = [array[..., y0 : y0 + height : stride, x0 : x0 + width : stride]
             for array in arrays for y0, x0, width in windows]
    parts = [np.asarray(p) for p in da.compute(*parts)]  # one graph: the windows read together
    n = len(windows)
    return [np.concatenate(parts[i * n : (i + 1) * n], axis=-1) for i in range(len(arrays))]


def cube_sample(cube: io.Cube, shading=None, **kwargs) -> np.ndarray:
    """:func:`pixel_sample` of a cube on its chunks' grid, read from its tiles, the shading divided out.

    ``shading``: ``(Shading, offset)`` or None.
    """
    grid = cube.data.chunks[-2:]
    source = cube.tiles if cube.tiles is not None else cube.data
    if shading is None:
        return pixel_sample(source, grid=grid, **kwargs)[0]
    from qdquant import illumination

    gain = illumination.inverse_field(shading[0], grid)
    raw, window_gain = pixel_sample(source, gain[None], grid=grid, **kwargs)
    return unmixing.apply_gain(raw, window_gain[0], shading[1])
