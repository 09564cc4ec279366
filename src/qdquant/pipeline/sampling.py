"""A few windows of a slide's pixels, read without touching the rest: what the unmix step
fits its corrections, its library and its noise model on."""

from __future__ import annotations

import dask.array as da
import numpy as np

from qdquant import io, unmixing


#: Edge of the cells of the fixed grid whose centres the sample windows lie in, pixels. The grid
#: is the slide's, not its chunks', so the same pixels are sampled whatever ``chunk_size`` is
#: (2048, the default chunk edge: at that chunking each window lies inside one chunk).
SAMPLE_GRID_PX = 2048


def sample_grid(shape, edge: int = SAMPLE_GRID_PX) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (Y, X) cell edges of a grid of ``edge``-pixel cells over a slide of ``shape`` (..., Y, X),
    as dask's chunk tuples (the last cell of a row or column shorter)."""
    return tuple(tuple([edge] * (int(n) // edge) + ([int(n) % edge] if int(n) % edge else []))
                 for n in shape[-2:])


def sample_windows(shape, *, n_blocks: int = 4, window: int = 384, max_pixels: int | None = None,
                   grid_px: int = SAMPLE_GRID_PX) -> tuple[list[tuple[int, int, int, int]], int]:
    """Where :func:`pixel_sample` reads on a slide of ``shape`` (..., Y, X): each window's
    ``(y0, x0, height, width)`` (one height for all), and the stride along Y and X."""
    ys, xs = sample_grid(shape, grid_px)
    y_edges, x_edges = np.cumsum((0,) + ys), np.cumsum((0,) + xs)
    picks = np.unique(np.linspace(0, len(ys) * len(xs) - 1, min(n_blocks, len(ys) * len(xs))).round().astype(int))
    height = min(min(ys[p // len(xs)] for p in picks), window)
    windows = []
    for p in picks:
        by, bx = p // len(xs), p % len(xs)
        width = min(xs[bx], window)
        windows.append((int(y_edges[by] + (ys[by] - height) // 2), int(x_edges[bx] + (xs[bx] - width) // 2),
                        height, width))
    total = height * sum(w for _, _, _, w in windows)
    stride = 1 if max_pixels is None else max(1, int(np.ceil(np.sqrt(total / max_pixels))))
    return windows, stride


def pixel_sample(*arrays: da.Array, n_blocks: int = 4, window: int = 384,
                  max_pixels: int | None = None, grid_px: int = SAMPLE_GRID_PX) -> list[np.ndarray]:
    """The same windows of a few evenly spaced cells of a fixed grid over lazy (..., Y, X) arrays,
    side by side along X.

    Enough pixels to fit a handful of parameters on (``n_blocks`` windows of
    at most ``window``² pixels, centred in their cells of the
    :func:`sample_grid` of ``grid_px``; :func:`sample_windows`), read without
    touching the rest of the slide. The grid depends on the slide's shape
    only, not on how the arrays are chunked, so every chunking samples the
    same pixels. With ``max_pixels``, each window is strided (the same stride
    along Y and X) to keep at most about that many pixels in all.
    """
    windows, stride = sample_windows(arrays[0].shape, n_blocks=n_blocks, window=window,
                                     max_pixels=max_pixels, grid_px=grid_px)
    parts = [array[..., y0 : y0 + height : stride, x0 : x0 + width : stride]
             for array in arrays for y0, x0, height, width in windows]
    parts = [np.asarray(p) for p in da.compute(*parts)]  # one graph: the windows read together
    n = len(windows)
    return [np.concatenate(parts[i * n : (i + 1) * n], axis=-1) for i in range(len(arrays))]


def cube_sample(cube: io.Cube, shading=None, **kwargs) -> np.ndarray:
    """:func:`pixel_sample` of a cube, read from its tiles, the shading divided out.

    ``shading``: ``(Shading, offset)`` or None.
    """
    source = cube.tiles if cube.tiles is not None else cube.data
    if shading is None:
        return pixel_sample(source, **kwargs)[0]
    from qdquant import illumination

    gain = illumination.inverse_field(shading[0], sample_grid(source.shape, kwargs.get("grid_px", SAMPLE_GRID_PX)))
    raw, window_gain = pixel_sample(source, gain[None], **kwargs)
    return unmixing.apply_gain(raw, window_gain[0], shading[1])
