"""Reading image files for detection: header probing, EXIF orientation, every PIL mode to 8-bit RGB.

* ``read_header`` opens a file and reads only its header: stored size, PIL mode and EXIF orientation.
  ``probe_headers`` does it for a whole data set with a thread pool (the threads overlap the file I/O of
  a cold disk or network storage; parsing a header holds the GIL), so missing, unreadable or mis-sized
  files are found when the data set is built, not when the image is first loaded. With a ``HeaderCache``
  a file whose size and mtime are those of its cached entry is not opened: a second start only stats.
* ``orientation_to_apply`` decides whether the EXIF orientation is applied, from the json's size:
  labelme and detectron2 apply the tag (the annotator saw the displayed image), torchvision's
  CocoDetection does not (it sees the stored pixels). The json's width/height says which one the boxes
  refer to: the displayed size -> apply it; the stored size -> do not; both (square images, or tags that
  only flip) -> apply it, as labelme does; neither -> an error naming EXIF.
* ``to_rgb_uint8`` converts any PIL mode to uint8 RGB with the value scaling the mode implies (PIL's own
  ``convert('RGB')`` clips 16-bit values, so a 16-bit PNG becomes almost white).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ["ImageHeader", "read_header", "probe_headers", "HeaderCache", "default_header_cache_dir",
           "orientation_to_apply", "apply_orientation", "to_rgb_uint8", "EXIF_ORIENTATION_TAG"]

logger = logging.getLogger(__name__)

EXIF_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # orientations whose displayed image is the stored one turned by 90 degrees
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says: stored ``width`` x ``height``, PIL ``mode`` and the EXIF
    ``orientation`` tag (None without one; 1 is the identity)."""
    width: int
    height: int
    mode: str
    orientation: Optional[int]

    @property
    def displayed_size(self) -> Tuple[int, int]:
        """(w, h) after applying the orientation (what a photo viewer, labelme or detectron2 shows)."""
        return (self.height, self.width) if self.orientation in _SWAPS_AXES else (self.width, self.height)


def _orientation(pil: Image.Image) -> Optional[int]:
    try:
        value = pil.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:  # a broken EXIF block: treat as no tag (the pixels are still readable)
        return None
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def read_header(path: str) -> ImageHeader:
    """Header of an image file (no pixel decoding). Raises FileNotFoundError or OSError (PIL cannot read it)."""
    with Image.open(path) as pil:
        return ImageHeader(int(pil.width), int(pil.height), pil.mode, _orientation(pil))


def orientation_to_apply(header: ImageHeader, json_wh: Tuple[int, int]) -> Tuple[Optional[int], Optional[str]]:
    """(orientation to apply or None, problem or None) for a file whose json entry says ``json_wh`` = (w, h).

    The problem is a sentence describing a size mismatch (naming EXIF when the file has the tag)."""
    stored = (header.width, header.height)
    json_wh = tuple(int(v) for v in json_wh)
    tag = header.orientation if header.orientation not in (None, 1) else None
    if tag is None:
        if json_wh == stored:
            return None, None
        return None, f"is {stored[0]}x{stored[1]} but the json says {json_wh[0]}x{json_wh[1]}"
    displayed = header.displayed_size
    if json_wh == displayed:
        return tag, None  # the annotator saw the displayed image (also when stored == displayed)
    if json_wh == stored:
        return None, None  # the annotator saw the stored pixels
    return None, (f"is stored as {stored[0]}x{stored[1]} with EXIF orientation {tag} (displayed "
                  f"{displayed[0]}x{displayed[1]}), but the json says {json_wh[0]}x{json_wh[1]}, which is neither")


def default_header_cache_dir() -> str:
    """Where header caches go unless the dataset's ``header_cache`` names a folder: ``$XDG_CACHE_HOME`` (else
    ``~/.cache``) ``/dset-rtdetr/image_headers``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dset-rtdetr", "image_headers")


def _valid_int(v, low: int) -> bool:
    return type(v) is int and v >= low


def _cached_header(entry) -> Optional[Tuple[int, int, ImageHeader]]:
    """(size, mtime_ns, header) of a cache entry [size, mtime_ns, width, height, mode, orientation]; None
    when it is malformed (it is then read again, never trusted)."""
    if not isinstance(entry, list) or len(entry) != 6:
        return None
    size, mtime, width, height, mode, orientation = entry
    if not (_valid_int(size, 0) and _valid_int(mtime, 0) and _valid_int(width, 1) and _valid_int(height, 1)
            and isinstance(mode, str) and mode and (orientation is None or (_valid_int(orientation, 1)
                                                                           and orientation <= 8))):
        return None
    return size, mtime, ImageHeader(width, height, mode, orientation)


class HeaderCache:
    """Image headers read before, keyed by (path, size, mtime): a file whose size or mtime (ns) differs from
    its entry is read again, and so is a malformed entry; an unreadable cache file is ignored with a warning.

    One json file per (annotation file, image folder) pair (`for_dataset`):
    ``{"version": 1, "headers": {path: [size, mtime_ns, width, height, mode, orientation]}}``, written
    atomically (temporary file, then rename), so processes building the same dataset at once (DDP ranks)
    never see half a file. Only headers that were read successfully are stored: a missing or unreadable file
    is checked again at every start."""

    VERSION = 1

    def __init__(self, file: str):
        self.file = file
        self._entries: Dict[str, Tuple[int, int, ImageHeader]] = {}
        self._dirty = False
        self.hits = 0
        self._load()

    @classmethod
    def for_dataset(cls, folder: str, ann_file: str, img_folder: str) -> "HeaderCache":
        """The cache of the images of `ann_file` under `img_folder`, in `folder`."""
        key = f"{os.path.abspath(ann_file)}\0{os.path.abspath(img_folder)}".encode()
        name = f"{os.path.splitext(os.path.basename(ann_file))[0]}-{hashlib.sha1(key).hexdigest()[:16]}.json"
        return cls(os.path.join(folder, name))

    def _load(self) -> None:
        if not os.path.exists(self.file):
            return
        try:
            with open(self.file, encoding="utf-8") as f:
                data = json.load(f)
            if not (isinstance(data, dict) and data.get("version") == self.VERSION
                    and isinstance(data.get("headers"), dict)):
                raise ValueError(f"not a version-{self.VERSION} header cache")
        except (OSError, ValueError) as e:   # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            logger.warning("image header cache %r cannot be used (%s): ignored, the headers are read again and "
                           "the cache rewritten", self.file, e)
            self._dirty = True
            return
        bad = 0
        for path, entry in data["headers"].items():
            cached = _cached_header(entry)
            if cached is None:
                bad += 1
            else:
                self._entries[path] = cached
        if bad:
            logger.warning("image header cache %r: %d malformed entries ignored (those headers are read again)",
                           self.file, bad)
            self._dirty = True

    def lookup(self, path: str, st: os.stat_result) -> Optional[ImageHeader]:
        """The cached header of `path` if its size and mtime are still `st`'s, else None."""
        cached = self._entries.get(path)
        if cached is None or cached[0] != st.st_size or cached[1] != st.st_mtime_ns:
            return None
        return cached[2]

    def update(self, headers: Dict[str, Tuple[os.stat_result, ImageHeader]]) -> None:
        """Make the entries those of `headers` (path -> (stat before reading, header)); the rest is dropped."""
        entries = {p: (st.st_size, st.st_mtime_ns, h) for p, (st, h) in headers.items()}
        if entries != self._entries:
            self._entries, self._dirty = entries, True

    def save(self) -> None:
        """Write the cache if it changed; a folder that cannot be written is a warning, not an error."""
        if not self._dirty:
            return
        data = {"version": self.VERSION,
                "headers": {p: [size, mtime, h.width, h.height, h.mode, h.orientation]
                            for p, (size, mtime, h) in self._entries.items()}}
        folder = os.path.dirname(self.file) or "."
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".headers-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(tmp, self.file)
        except OSError as e:
            logger.warning("image header cache %r not written (%s); the next start reads every header again",
                           self.file, e)
            return
        self._dirty = False


def probe_headers(paths: Sequence[str], max_workers: Optional[int] = None, cache: Optional[HeaderCache] = None,
                  chunk: int = 256) -> List[Tuple[Optional[ImageHeader], Optional[str]]]:
    """``read_header`` for every path, in parallel: per path (header, None) or (None, 'missing' / reason).

    max_workers: threads (default min(8, CPUs)); each takes `chunk` paths at a time. cache: headers of files
    whose size and mtime are unchanged come from it (``cache.hits`` counts them), and it is updated and saved."""
    def one(path: str):   # (header, problem, stat before reading, from the cache)
        try:
            st = os.stat(path)
        except OSError:
            return None, "is missing", None, False
        if not stat.S_ISREG(st.st_mode):
            return None, "is missing", None, False
        header = cache.lookup(path, st) if cache is not None else None
        if header is not None:
            return header, None, st, True
        try:
            return read_header(path), None, st, False
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            return None, f"cannot be read as an image ({e})", None, False

    def part(start: int):
        return [one(p) for p in paths[start:start + chunk]]

    workers = max_workers or min(8, os.cpu_count() or 1)
    starts = range(0, len(paths), chunk)
    if len(starts) <= 1 or workers == 1:
        results = [r for s in starts for r in part(s)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = [r for rows in pool.map(part, starts) for r in rows]
    if cache is not None:
        cache.hits = sum(hit for *_, hit in results)
        cache.update({p: (st, h) for p, (h, _, st, _) in zip(paths, results) if h is not None})
        cache.save()
    return [(header, problem) for header, problem, _, _ in results]


def apply_orientation(rgb: np.ndarray, orientation: Optional[int]) -> np.ndarray:
    """Turn/flip an [H, W, C] array from its stored layout to the displayed one (EXIF orientation 1-8,
    the same transforms as ``PIL.ImageOps.exif_transpose``)."""
    if orientation in (None, 1):
        return rgb
    ops: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        2: lambda a: a[:, ::-1],                          # mirrored left-right
        3: lambda a: a[::-1, ::-1],                       # rotated 180
        4: lambda a: a[::-1],                             # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),                # transposed
        6: lambda a: np.rot90(a, k=-1),                   # displayed = stored turned 90 degrees clockwise
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),    # transversed
        8: lambda a: np.rot90(a, k=1),                    # displayed = stored turned 90 degrees anticlockwise
    }
    if orientation not in ops:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")
    return np.ascontiguousarray(ops[orientation](rgb))


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _scale_to_uint8(values: np.ndarray, high: float, what: str) -> Tuple[np.ndarray, Optional[str]]:
    """Map [0, high] linearly to [0, 255] (rounded); values outside are clipped and reported."""
    v = values.astype(np.float64)
    note = None
    lo, hi = float(np.nanmin(v)) if v.size else 0.0, float(np.nanmax(v)) if v.size else 0.0
    if lo < 0 or hi > high or np.isnan(v).any():
        note = (f"{what} has values in [{lo:g}, {hi:g}], outside the expected [0, {high:g}]; "
                f"they were clipped (NaN -> 0)")
    v = np.nan_to_num(v, nan=0.0).clip(0.0, high)
    return np.floor(v * (255.0 / high) + 0.5).astype(np.uint8), note


def to_rgb_uint8(pil: Image.Image) -> Tuple[np.ndarray, Optional[str]]:
    """Decode a PIL image to uint8 RGB [H, W, 3] with the scaling its mode implies; (array, note or None).

    * ``I;16*`` (16-bit grey, e.g. 16-bit PNG) and ``I`` (32-bit integer; 16-bit PNGs open as I in
      older Pillow): the 16-bit range [0, 65535] maps to [0, 255] (v / 257, rounded).
    * ``F`` (32-bit float): [0, 1] maps to [0, 255].
    * ``CMYK``: R = (255 - C)(255 - K) / 255 (and G, B from M, Y), rounded.
    * anything with alpha (``LA``, ``PA``, ``RGBA``, ``La``, ``RGBa``) or a ``transparency`` entry
      (``P`` / ``L`` / ``RGB`` with a transparent colour): composited over black (the padding colour).
    * ``1``, ``L``, ``P``, ``RGB``, ``YCbCr``, ...: PIL's conversion (8-bit already).

    The note describes values outside the mode's range (clipped), so the caller can warn once per file.
    """
    mode = pil.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        grey, note = _scale_to_uint8(np.asarray(pil), 65535.0, f"{mode} image")
        return _grey_to_rgb(grey), note
    if mode == "F":
        grey, note = _scale_to_uint8(np.asarray(pil), 1.0, "F (float) image")
        return _grey_to_rgb(grey), note
    if mode == "CMYK":
        cmyk = np.asarray(pil).astype(np.uint32)
        inv_k = 255 - cmyk[:, :, 3:4]
        rgb = ((255 - cmyk[:, :, :3]) * inv_k + 127) // 255
        return rgb.astype(np.uint8), None
    if "A" in mode or "a" in mode or "transparency" in pil.info:
        rgba = np.asarray(pil.convert("RGBA")).astype(np.uint32)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255
        return rgb.astype(np.uint8), None
    return np.array(pil.convert("RGB")), None  # a writable copy (torch.from_numpy needs one)
