"""Dataset readers for dataset-scale runs: image folders, ImageNet val, Waterbirds, ImageNet-Segmentation.

Every reader is an :class:`ImageSource`: a fixed, deterministic order of items, each with a
stable string id (its path relative to the root, POSIX style), an optional class label,
JSON-able metadata and a :meth:`~ImageSource.load` that returns an RGB PIL image or raises
:class:`~vitdecomp.errors.InputError`. :func:`load_batch` and :func:`iter_batches` turn rows of a
source into :class:`DatasetBatch` es (one batch = one store chunk); an item that cannot be read or
transformed is marked invalid with its reason and never stops a run.

Example::

    source = open_dataset("/data/imagenet/val")          # kind detected
    for chunk, batch in iter_batches(source, transform, 64, range(n_chunks), num_workers=8):
        batch.pixels            # [n_valid, C, H, W], valid rows only, in row order
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import InputError
from .images import IMAGE_SUFFIXES, check_image_size, load_image, record_skip, skip_reason

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

__all__ = [
    "ImageSource", "ImageSourceBase", "ImageFolder", "ImageNetVal", "Waterbirds", "ImageNetSegmentation",
    "DatasetBatch", "load_batch", "iter_batches", "chunk_rows", "open_dataset", "KINDS",
]

log = logging.getLogger(__name__)

KINDS = ("folder", "imagenet-val", "waterbirds", "imagenet-seg")
_ALIASES = {"imagefolder": "folder", "images": "folder", "imagenet": "imagenet-val",
            "imagenet-segmentation": "imagenet-seg", "waterbird": "waterbirds"}
_WNID = re.compile(r"^n\d{8}$")
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")
WATERBIRDS_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}


@runtime_checkable
class ImageSource(Protocol):
    """A fixed, ordered collection of images (what a store's rows are)."""

    name: str
    root: str

    def __len__(self) -> int: ...
    def id(self, index: int) -> str: ...
    def label(self, index: int) -> int | None: ...
    def metadata(self, index: int) -> dict[str, Any]: ...
    def load(self, index: int) -> Image.Image: ...
    def fingerprint(self) -> dict[str, Any]: ...


class ImageSourceBase:
    """Shared code: a list of files with ids, labels and metadata, read with :func:`load_image`.

    Subclasses fill ``_files`` (absolute paths), ``_ids``, ``_labels`` and optionally ``_meta``
    (all the same length, in item order) and set ``name`` / ``root`` / ``classes``.
    """

    name = "source"
    root = ""
    classes: list[str] | None = None

    def __init__(self) -> None:
        self._files: list[Path] = []
        self._ids: list[str] = []
        self._labels: list[int | None] = []
        self._meta: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}, n={len(self)})"

    def _check(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} items")
        return index

    def id(self, index: int) -> str:
        """Stable id of item ``index`` (path relative to :attr:`root`, POSIX style)."""
        return self._ids[self._check(index)]

    def label(self, index: int) -> int | None:
        """Class index of item ``index``, or None when unknown."""
        return self._labels[self._check(index)]

    def metadata(self, index: int) -> dict[str, Any]:
        """JSON-able extras of item ``index`` (empty unless the dataset has some)."""
        self._check(index)
        return dict(self._meta[index]) if self._meta is not None else {}

    def path(self, index: int) -> Path:
        """File of item ``index``."""
        return self._files[self._check(index)]

    def load(self, index: int) -> Image.Image:
        """Item ``index`` as a decoded RGB image (:func:`~vitdecomp.data.images.load_image`'s skip rules).

        Raises:
            UnusableImageError: unreadable, corrupt, too small or too large (an InputError).
        """
        return load_image(self.path(index))

    def _item_sizes(self) -> list[int] | None:
        sizes = []
        for path in self._files:
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                sizes.append(-1)
        return sizes

    def fingerprint(self) -> dict[str, Any]:
        """``{"kind", "n", "sha256"}``: sha256 over the ordered (id, file size, label) list."""
        digest = hashlib.sha256()
        sizes = self._item_sizes()
        for i, item_id in enumerate(self._ids):
            size = sizes[i] if sizes is not None else ""
            digest.update(f"{item_id}\t{size}\t{self._labels[i]}\n".encode())
        return {"kind": self.name, "n": len(self), "sha256": digest.hexdigest()}


def _walk_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, follows directory links once, hidden entries skipped)."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return found


class ImageFolder(ImageSourceBase):
    """Images under a directory (recursive) or a list of image files, sorted by relative POSIX path.

    Class folders are optional: when every image lies under a first-level subfolder, the label
    of an image is the index of its subfolder name in sorted order (listed in :attr:`classes`);
    otherwise labels are None. Hidden files and directories are skipped. For a list of files,
    :attr:`root` is their common parent directory.
    """

    name = "folder"

    def __init__(self, root: str | Path | Sequence[str | Path]) -> None:
        super().__init__()
        if isinstance(root, (str, Path)) and Path(root).is_dir():
            base = Path(root)
            files = _walk_images(base)
        else:
            entries = [Path(root)] if isinstance(root, (str, Path)) else [Path(p) for p in root]
            if not entries:
                raise InputError("no image files given")
            files = []
            for entry in entries:
                if entry.is_dir():
                    files.extend(_walk_images(entry))
                elif entry.is_file():
                    files.append(entry)
                else:
                    raise InputError(f"no such file or directory: {entry}")
            files = list({os.path.abspath(f): f for f in files}.values())
            if not files:
                raise InputError(f"no image files found in {', '.join(map(str, entries))}")
            base = Path(os.path.commonpath([os.path.abspath(f.parent) for f in files]))
        if not files:
            raise InputError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {base}")
        base_abs = os.path.abspath(base)
        rels = [Path(os.path.relpath(os.path.abspath(f), base_abs)) for f in files]
        order = sorted(range(len(files)), key=lambda i: rels[i].as_posix())
        self.root = str(base)
        self._files = [Path(base_abs, rels[i]) for i in order]
        self._ids = [rels[i].as_posix() for i in order]
        if all(len(rels[i].parts) >= 2 for i in order):
            self.classes = sorted({rels[i].parts[0] for i in order})
            index = {c: k for k, c in enumerate(self.classes)}
            self._labels = [index[rels[i].parts[0]] for i in order]
        else:
            self.classes = None
            self._labels = [None] * len(order)


def _find_near(root: Path, names: Sequence[str]) -> Path | None:
    """First of ``names`` found in ``root``, its devkit ``data`` folder, or up to 3 parent folders."""
    for folder in [root, *list(root.resolve().parents)[:3]]:
        for sub in (folder, folder / "ILSVRC2012_devkit_t12" / "data"):
            for name in names:
                if (sub / name).is_file():
                    return sub / name
    return None


def _synset_wnids(root: Path) -> list[str] | None:
    """Sorted wnids from LOC_synset_mapping.txt / synset_words.txt near ``root``, if present."""
    found = _find_near(root, ["LOC_synset_mapping.txt", "synset_words.txt"])
    if found is None:
        return None
    return sorted({line.split()[0] for line in found.read_text().splitlines() if line.strip()})


def _devkit_to_sorted(meta_mat: Path) -> dict[int, int] | None:
    """Map ILSVRC2012 devkit ids (1-based) to sorted-wnid indices from the devkit ``meta.mat`` (needs scipy)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        log.warning("%s found but scipy is not installed; labels stay in devkit order (id - 1)", meta_mat)
        return None
    try:
        synsets = loadmat(str(meta_mat), squeeze_me=True)["synsets"]
        leaves = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except Exception as exc:  # noqa: BLE001 - any unreadable meta.mat just disables the mapping
        log.warning("cannot read %s (%s); labels stay in devkit order (id - 1)", meta_mat, exc)
        return None
    order = {wnid: k for k, wnid in enumerate(sorted(leaves.values()))}
    return {devkit_id: order[wnid] for devkit_id, wnid in leaves.items()}


def _wnid_dirs(root: Path) -> list[str]:
    """Sorted non-hidden subfolder names of ``root`` if all of them are wnids (n01440764), else []."""
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    return subdirs if all(_WNID.match(d) for d in subdirs) else []


def _imagenet_layout(root: Path) -> str | None:
    """"classes" (wnid folders of ILSVRC2012_val_* files), "flat" (val files + label file), or None."""
    if not root.is_dir():
        return None
    wnids = _wnid_dirs(root)
    if wnids and any(_VAL_NAME.match(f.name) for f in os.scandir(root / wnids[0])):
        return "classes"
    has_val = any(_VAL_NAME.match(e.name) for e in os.scandir(root) if e.is_file())
    if has_val and _find_near(root, ["LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt"]):
        return "flat"
    return None


class ImageNetVal(ImageSourceBase):
    """ImageNet (ILSVRC2012) validation images, sorted by file name (ILSVRC2012_val_00000001 first).

    Layouts and labels:

    * wnid class folders (``n01440764/ILSVRC2012_val_....JPEG``): label = index of the wnid in the
      sorted wnid list, the standard 1000-class order (the full list comes from a
      LOC_synset_mapping.txt / synset_words.txt near the root when present, else from the folders
      found, which for a subset is *not* the 1000-class index; a warning says so).
    * flat folder + ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token of
      PredictionString is the wnid): label = index of the wnid in sorted order.
    * flat folder + ``ILSVRC2012_validation_ground_truth.txt`` (line k = 1-based ILSVRC2012 devkit id
      of image k): labels are mapped to sorted-wnid order when the devkit ``meta.mat`` is near the
      root and scipy is installed; otherwise labels are the **devkit ids minus 1**, which is a
      different class order, and :attr:`label_order` is ``"devkit"``.

    Label files are looked for in the root, its ``ILSVRC2012_devkit_t12/data`` folder and up to 3
    parent folders. :attr:`classes` lists the wnids when the labels index them.
    """

    name = "imagenet-val"

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        base = Path(root)
        if not base.is_dir():
            raise InputError(f"ImageNet val: no such directory: {base}")
        self.root = str(base)
        self.label_order: str | None = "sorted-wnid"
        layout = "classes" if _wnid_dirs(base) else "flat"
        files = _walk_images(base) if layout == "classes" else [
            Path(e.path) for e in os.scandir(base) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
            and not e.name.startswith(".")]
        if not files:
            raise InputError(f"ImageNet val: no images found under {base}")
        files.sort(key=lambda p: (p.name, p.as_posix()))
        self._files = files
        self._ids = [Path(os.path.relpath(f, base)).as_posix() for f in files]
        synsets = _synset_wnids(base)
        if layout == "classes":
            wnids = [Path(i).parts[0] for i in self._ids]
            found = sorted({w for w in wnids if _WNID.match(w)})
            self.classes = synsets if synsets and set(found) <= set(synsets) else found
            if len(self.classes) != 1000:
                log.warning("ImageNet val: %d classes (not 1000): labels index these classes only",
                            len(self.classes))
            index = {w: k for k, w in enumerate(self.classes)}
            self._labels = [index.get(w) for w in wnids]
            return
        solution = _find_near(base, ["LOC_val_solution.csv"])
        truth = _find_near(base, ["ILSVRC2012_validation_ground_truth.txt"])
        if solution is not None:
            with open(solution, newline="") as fh:
                reader = csv.DictReader(fh)
                if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
                    raise InputError(f"{solution}: expected columns ImageId,PredictionString")
                by_image = {r["ImageId"]: r["PredictionString"].split()[0] for r in reader
                            if r["PredictionString"].strip()}
            self.classes = sorted(set(synsets or []) | set(by_image.values()))
            index = {w: k for k, w in enumerate(self.classes)}
            self._labels = [index.get(by_image.get(f.stem, ""), None) for f in files]
        elif truth is not None:
            devkit = [int(t) for t in truth.read_text().split()]
            meta = _find_near(base, ["meta.mat"])
            mapping = _devkit_to_sorted(meta) if meta is not None else None
            if mapping is None:
                self.label_order, self.classes = "devkit", None
                log.warning("ImageNet val: labels are ILSVRC2012 devkit ids - 1 (not sorted-wnid order)")
            else:
                self.classes = synsets
            self._labels = []
            for f in files:
                m = _VAL_NAME.match(f.name)
                k = int(m.group(1)) - 1 if m else -1
                dk = devkit[k] if 0 <= k < len(devkit) else None
                self._labels.append(None if dk is None else (mapping.get(dk) if mapping else dk - 1))
        else:
            self.label_order, self.classes = None, synsets
            self._labels = [None] * len(files)
            log.warning("ImageNet val: no label file found near %s; labels are None", base)
        missing = sum(lab is None for lab in self._labels)
        if missing and self.label_order is not None:
            log.warning("ImageNet val: %d of %d images have no label", missing, len(files))

    def fingerprint(self) -> dict[str, Any]:
        """As :meth:`ImageSourceBase.fingerprint`, plus ``label_order``."""
        return {**super().fingerprint(), "label_order": self.label_order}


def _is_waterbirds(root: Path) -> bool:
    meta = root / "metadata.csv"
    if not meta.is_file():
        return False
    with open(meta, newline="") as fh:
        header = next(csv.reader(fh), [])
    return set(WATERBIRDS_COLUMNS) <= {h.strip() for h in header}


class Waterbirds(ImageSourceBase):
    """Waterbirds (Sagawa et al.): ``metadata.csv`` + image files, ordered by ``img_id``.

    ``metadata.csv`` columns: img_id, img_filename, y (0 landbird / 1 waterbird), split
    (0/1/2 = train/val/test), place (0 land / 1 water), place_filename. Label = y; metadata =
    ``{"img_id", "y", "split" (name), "place", "place_filename", "group": 2*y + place}``.
    ``split`` keeps only that split's rows.
    """

    name = "waterbirds"

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        super().__init__()
        base = Path(root)
        meta_path = base / "metadata.csv"
        if not meta_path.is_file():
            raise InputError(f"Waterbirds: {meta_path} not found")
        if split is not None and split not in WATERBIRDS_SPLITS:
            raise InputError(f"Waterbirds: unknown split {split!r}; use one of {', '.join(WATERBIRDS_SPLITS)}")
        self.root, self.split = str(base), split
        split_names = {v: k for k, v in WATERBIRDS_SPLITS.items()}
        with open(meta_path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            missing = [c for c in WATERBIRDS_COLUMNS if c not in fields]
            if missing:
                raise InputError(f"Waterbirds: {meta_path} lacks column(s) {', '.join(missing)}")
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
        items = []
        for line, r in enumerate(rows, start=2):
            try:
                img_id, y, sp, place = int(r["img_id"]), int(float(r["y"])), int(float(r["split"])), int(
                    float(r["place"]))
            except ValueError as exc:
                raise InputError(f"Waterbirds: {meta_path} line {line}: bad number ({exc})") from exc
            if sp not in split_names:
                raise InputError(f"Waterbirds: {meta_path} line {line}: split must be 0, 1 or 2, got {sp}")
            if split is None or split_names[sp] == split:
                items.append((img_id, r["img_filename"], y, split_names[sp], place, r["place_filename"]))
        items.sort(key=lambda t: t[0])
        if not items:
            raise InputError(f"Waterbirds: no rows{f' in split {split!r}' if split else ''} in {meta_path}")
        self.classes = ["landbird", "waterbird"]
        self._files = [base / t[1] for t in items]
        self._ids = [Path(t[1]).as_posix() for t in items]
        self._labels = [t[2] for t in items]
        self._meta = [{"img_id": t[0], "y": t[2], "split": t[3], "place": t[4], "place_filename": t[5],
                       "group": 2 * t[2] + t[4]} for t in items]

    def fingerprint(self) -> dict[str, Any]:
        """As :meth:`ImageSourceBase.fingerprint`, plus ``split``."""
        return {**super().fingerprint(), "split": self.split}


class ImageNetSegmentation(ImageSourceBase):
    """ImageNet-Segmentation (Guillaumin et al.) ``gtsegs_ijcv.mat``: MATLAB v7.3 (HDF5) file.

    ``/value/img``, ``/value/gt`` and ``/value/id`` are ``[N, 1]`` arrays of object references
    (MATLAB cells). An image reference points to a uint8 array stored transposed, ``[3, W, H]``;
    a ground-truth reference points to a ``[1, 1]`` cell whose reference points to a ``[W, H]``
    uint8 mask (one level of references is also accepted). The file is opened lazily, once per
    process (the reader pickles to just its path, so DataLoader workers reopen it).
    """

    name = "imagenet-seg"

    def __init__(self, mat_path: str | Path) -> None:
        super().__init__()
        import h5py

        path = Path(mat_path)
        if not path.is_file():
            raise InputError(f"ImageNet-Segmentation: no such file: {path}")
        self.root, self._path = str(path), path
        self._h5: Any = None
        self._pid: int | None = None
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in ("value/img", "value/gt") if k not in f]
                if missing:
                    raise InputError(f"ImageNet-Segmentation: {path} lacks dataset(s) /{', /'.join(missing)}")
                shape = f["value/img"].shape
        except OSError as exc:
            raise InputError(f"ImageNet-Segmentation: {path} is not a MATLAB v7.3 (HDF5) file ({exc})") from exc
        if len(shape) != 2 or 1 not in shape:
            raise InputError(f"ImageNet-Segmentation: /value/img has shape {shape}, expected [N, 1] references")
        self._row_major = shape[0] == 1 and shape[1] > 1  # a [1, N] cell array
        n = shape[1] if self._row_major else shape[0]
        self._ids = [f"imagenet-seg/{i:05d}" for i in range(n)]
        self._labels = [None] * n

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_h5": None, "_pid": None}

    def _file(self) -> Any:
        if self._h5 is None or self._pid != os.getpid():
            import h5py

            self._h5, self._pid = h5py.File(self._path, "r"), os.getpid()
        return self._h5

    def _deref(self, key: str, index: int) -> np.ndarray:
        """The array the ``[index, 0]`` reference of ``/value/<key>`` points to (following nested cells)."""
        import h5py
        import numpy as np

        f = self._file()
        self._check(index)
        arr = f["value"][key][(0, index) if self._row_major else (index, 0)]
        for _ in range(4):
            if not isinstance(arr, h5py.Reference):
                return np.asarray(arr)
            data = f[arr]
            arr = data[()] if h5py.check_ref_dtype(data.dtype) is None else data[(0,) * data.ndim]
        raise InputError(f"{self.root}: /value/{key}[{index}] references nest too deep")

    def load(self, index: int) -> Image.Image:
        """Item ``index`` as RGB; the stored ``[3, W, H]`` array is transposed to ``[H, W, 3]``."""
        import numpy as np
        from PIL import Image

        try:
            arr = self._deref("img", index)
            arr = arr.T if arr.ndim in (2, 3) else None
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - h5py raises many types for damaged data
            raise InputError(f"{self.id(index)}: cannot read image ({exc})") from exc
        if arr is None or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise InputError(f"{self.id(index)}: unexpected image array in {self.root}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        check_image_size((arr.shape[1], arr.shape[0]), self.id(index))  # the same size rules as image files
        return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8, copy=False))).convert("RGB")

    def mask(self, index: int) -> np.ndarray:
        """Ground-truth foreground mask of item ``index``: uint8 ``[H, W]`` (stored ``[W, H]``, transposed)."""
        import numpy as np

        arr = self._deref("gt", index)
        if arr.ndim != 2:
            raise InputError(f"{self.id(index)}: ground truth is {arr.ndim}-D, expected 2-D")
        return np.ascontiguousarray(arr.T.astype(np.uint8, copy=False))

    def metadata(self, index: int) -> dict[str, Any]:
        """``{"index": i}`` plus ``"source_id"``: the stored ``/value/id`` when it decodes."""
        meta: dict[str, Any] = {"index": self._check(index)}
        try:
            if "id" in self._file()["value"]:
                arr = self._deref("id", index)
                if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # MATLAB char array
                    meta["source_id"] = "".join(chr(c) for c in arr.T.ravel() if c)
                elif arr.size == 1:
                    meta["source_id"] = arr.ravel()[0].item()
        except Exception as exc:  # noqa: BLE001 - the id is optional metadata
            log.debug("cannot decode /value/id[%d]: %s", index, exc)
        return meta

    def _item_sizes(self) -> list[int] | None:
        return None

    def fingerprint(self) -> dict[str, Any]:
        """As :meth:`ImageSourceBase.fingerprint` (no per-item sizes), plus the .mat file size."""
        return {**super().fingerprint(), "file_size": self._path.stat().st_size}


@dataclass
class DatasetBatch:
    """The rows of one chunk: ``pixels`` holds the valid items only, in row order.

    Shapes: ``valid`` bool ``[len(rows)]``; ``pixels`` ``[n_valid, C, H, W]`` (None when no item is
    valid); ``ids`` and ``labels`` have ``len(rows)`` entries; ``skipped`` maps id -> reason.
    """

    rows: range
    ids: list[str]
    valid: torch.Tensor
    pixels: torch.Tensor | None
    labels: list[int | None]
    skipped: dict[str, str] = field(default_factory=dict)


def load_batch(source: ImageSource, rows: range, transform: Callable[[Image.Image], torch.Tensor]) -> DatasetBatch:
    """Load and transform ``rows`` of ``source``; items that fail to load or transform are skipped.

    Every transformed item must have the shape of the first valid one; one that does not is skipped.
    """
    import torch

    if rows.step != 1 or rows.start < 0 or rows.stop > len(source):
        raise InputError(f"rows {rows} are not a contiguous range inside 0..{len(source)}")
    ids, labels, tensors, valid = [], [], [], []
    skipped: dict[str, str] = {}
    for row in rows:
        item_id = source.id(row)
        ids.append(item_id)
        labels.append(source.label(row))
        try:
            image = source.load(row)
        except Exception as exc:  # noqa: BLE001 - any unreadable item is skipped, not fatal
            record_skip(skipped, item_id, exc if isinstance(exc, InputError) else InputError(
                f"cannot load: {skip_reason(exc)}"))
            valid.append(False)
            continue
        try:
            tensor = torch.as_tensor(transform(image))
            if tensors and tensor.shape != tensors[0].shape:
                raise ValueError(f"shape {tuple(tensor.shape)} differs from {tuple(tensors[0].shape)}")
            tensors.append(tensor)
            valid.append(True)
            continue
        except Exception as exc:  # noqa: BLE001 - a transform failing on one image skips it
            record_skip(skipped, item_id, InputError(f"transform failed: {type(exc).__name__}: {exc}"))
        valid.append(False)
    return DatasetBatch(rows, ids, torch.tensor(valid, dtype=torch.bool),
                        torch.stack(tensors) if tensors else None, labels, skipped)


def chunk_rows(index: int, batch_size: int, n_items: int) -> range:
    """Rows of chunk ``index``: ``[index*batch_size, min((index+1)*batch_size, n_items))``."""
    if batch_size < 1:
        raise InputError("batch size must be at least 1")
    start = index * batch_size
    if index < 0 or start >= n_items:
        raise InputError(f"chunk {index} is out of range for {n_items} items in chunks of {batch_size}")
    return range(start, min(start + batch_size, n_items))


class _Chunks:
    """Map-style dataset: item k = the :class:`DatasetBatch` of ``chunks[k]`` (runs in DataLoader workers)."""

    def __init__(self, source: ImageSource, transform: Callable, batch_size: int, chunks: Sequence[int]) -> None:
        self.source, self.transform, self.batch_size, self.chunks = source, transform, batch_size, list(chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> DatasetBatch:
        rows = chunk_rows(self.chunks[k], self.batch_size, len(self.source))
        return load_batch(self.source, rows, self.transform)


def _identity(x: Any) -> Any:
    return x


def iter_batches(
    source: ImageSource, transform: Callable[[Image.Image], torch.Tensor], batch_size: int, chunks: Sequence[int],
    *, num_workers: int = 0, prefetch: int = 2,
) -> Iterator[tuple[int, DatasetBatch]]:
    """Yield ``(chunk_index, batch)`` for each of ``chunks``, in that order.

    Chunk i covers rows ``[i*batch_size, min((i+1)*batch_size, len(source)))``. With
    ``num_workers > 0`` decoding runs in DataLoader worker processes, with at most
    ``num_workers * prefetch`` batches in flight; the results are the same as with 0 workers.
    """
    chunks = list(chunks)
    for index in chunks:
        chunk_rows(index, batch_size, len(source))  # validate up front
    dataset = _Chunks(source, transform, batch_size, chunks)
    if num_workers <= 0:
        for k, index in enumerate(chunks):
            yield index, dataset[k]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity,
                        persistent_workers=False, prefetch_factor=max(1, prefetch))
    yield from zip(chunks, loader)


def open_dataset(
    path: str | Path | Sequence[str | Path], *, kind: str | None = None, split: str | None = None
) -> ImageSource:
    """Open ``path`` as an :class:`ImageSource` of ``kind`` (one of :data:`KINDS`), detected when None.

    Detection: a ``.mat`` file -> ImageNetSegmentation; a directory with a Waterbirds
    ``metadata.csv`` -> Waterbirds; an ImageNet val layout -> ImageNetVal; any other directory, an
    image file or a list of files -> ImageFolder. ``split`` applies to Waterbirds only.
    """
    if not isinstance(path, (str, Path)):
        paths = [Path(p) for p in path]
        if kind not in (None, "folder"):
            raise InputError(f"a list of files can only be read as kind 'folder', not {kind!r}")
        if split is not None:
            raise InputError("split applies to Waterbirds only")
        return ImageFolder(paths)
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    if kind is not None:
        kind = _ALIASES.get(kind.lower(), kind.lower())
        if kind not in KINDS:
            raise InputError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    elif p.is_file():
        kind = "imagenet-seg" if p.suffix.lower() == ".mat" else "folder"
    elif _is_waterbirds(p):
        kind = "waterbirds"
    elif _imagenet_layout(p):
        kind = "imagenet-val"
    else:
        kind = "folder"
    log.info("reading %s as %s", p, kind)
    if split is not None and kind != "waterbirds":
        raise InputError(f"split applies to Waterbirds only, not {kind!r}")
    if kind == "waterbirds":
        return Waterbirds(p, split)
    if kind == "imagenet-seg":
        return ImageNetSegmentation(p)
    if kind == "imagenet-val":
        return ImageNetVal(p)
    return ImageFolder(p)
