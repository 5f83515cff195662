"""Write small files in ImageNet-Segmentation's ``gtsegs_ijcv.mat`` layout (MATLAB v7.3 / HDF5), for tests.

The layout is the one :class:`vitdecomp.data.datasets.ImageNetSegmentation` reads: ``/value/{img,gt,id}`` are ``[N, 1]`` object-
reference cells; referenced arrays live in ``/#refs#`` and are stored transposed as MATLAB
does (image ``[H, W, 3]`` -> ``[3, W, H]``, mask ``[H, W]`` -> ``[W, H]``); ``gt`` is a cell of
``[1, 1]`` cells, as in the real file; a 512-byte MAT header sits in the HDF5 user block.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_gtsegs"]

_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


def write_gtsegs(
    path: str | Path, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], ids: Sequence[str] | None = None
) -> Path:
    """Write ``images`` (uint8 ``[H, W, 3]``) and ``masks`` (uint8 ``[H, W]``) as a ``gtsegs_ijcv.mat``.

    ``ids`` default to ``"item00000"``, ... (MATLAB char rows). Returns the path.
    """
    import h5py

    p = Path(path)
    n = len(images)
    if len(masks) != n:
        raise ValueError(f"{n} images but {len(masks)} masks")
    names = list(ids) if ids is not None else [f"item{i:05d}" for i in range(n)]
    with h5py.File(p, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        value.attrs["MATLAB_class"] = np.bytes_("struct")
        cells = {key: value.create_dataset(key, (n, 1), dtype=h5py.ref_dtype) for key in ("img", "gt", "id")}
        for cell in cells.values():
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
        for i, (img, mask, name) in enumerate(zip(images, masks, names)):
            d_img = refs.create_dataset(f"img{i}", data=np.ascontiguousarray(np.asarray(img).T))
            d_img.attrs["MATLAB_class"] = np.bytes_("uint8")
            cells["img"][i, 0] = d_img.ref
            d_gt = refs.create_dataset(f"gt{i}", data=np.ascontiguousarray(np.asarray(mask).T))
            d_gt.attrs["MATLAB_class"] = np.bytes_("uint8")
            inner = refs.create_dataset(f"gtcell{i}", (1, 1), dtype=h5py.ref_dtype)
            inner[0, 0] = d_gt.ref
            inner.attrs["MATLAB_class"] = np.bytes_("cell")
            cells["gt"][i, 0] = inner.ref
            chars = np.array([[ord(c) for c in name]], dtype=np.uint16)  # MATLAB char row [1, L]
            d_id = refs.create_dataset(f"id{i}", data=chars.T)  # stored [L, 1]
            d_id.attrs["MATLAB_class"] = np.bytes_("char")
            cells["id"][i, 0] = d_id.ref
    with open(p, "r+b") as fh:
        fh.write(_HEADER.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")
    return p
