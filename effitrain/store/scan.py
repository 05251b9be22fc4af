"""List the images of a source folder exactly as torchvision's ImageFolder would.

Two layouts:
  * an ImageFolder tree (one sub-folder per class): classes, ``class_to_idx``, accepted
    extensions and sample order come from torchvision's own helpers, so a store means the
    same thing as ``torchvision.datasets.ImageFolder(src)``;
  * a flat folder plus a label file (``--labels``), lines ``filename,class_name`` (how
    ImageNet's validation set ships). Classes are the sorted distinct names, samples are
    ordered as ImageFolder would order the same files moved into class folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


class SourceError(ValueError):
    """The source folder or label file cannot be used (missing, empty, malformed)."""


@dataclass(frozen=True)
class Source:
    """What to convert: the root folder, the classes and the (relative path, label) samples."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]

    def fingerprint(self) -> str:
        """A digest of the classes and samples: a resumed run must see the same listing."""
        h = hashlib.sha256(json.dumps([self.classes, self.samples]).encode())
        return h.hexdigest()


def scan_imagefolder(root: str | os.PathLike) -> Source:
    """List an ImageFolder tree with torchvision's ``find_classes`` and ``make_dataset``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset  # imports torch: only here

    root = _existing_dir(root)
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise SourceError(f"{root}: {e}") from None
    # make_dataset joins the root and each file's folders and name: cutting that prefix off
    # costs nothing, where pathlib's relative_to took ~8 us a file (10 s on ImageNet).
    prefix = os.path.join(os.path.expanduser(root), "")
    rel = [(path[len(prefix):].replace(os.sep, "/"), label) for path, label in samples]
    return Source(root, classes, rel)


def scan_flat(root: str | os.PathLike, labels_file: str | os.PathLike) -> Source:
    """List a flat folder of images labelled by ``labels_file`` (``filename,class_name``)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    root = _existing_dir(root)
    labels_path = Path(labels_file)
    try:
        lines = labels_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{labels_path}: cannot read label file ({e})") from None
    by_name: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, cls = line.rpartition(",")
        name, cls = name.strip(), cls.strip()
        if not sep or not name or not cls:
            raise SourceError(f"{labels_path}:{lineno}: expected 'filename,class_name', got {line!r}")
        if name in by_name:
            raise SourceError(f"{labels_path}:{lineno}: {name} is listed twice")
        if not has_file_allowed_extension(name, IMG_EXTENSIONS):
            raise SourceError(f"{labels_path}:{lineno}: {name} does not have an image extension {IMG_EXTENSIONS}")
        if not (root / name).is_file():
            raise SourceError(f"{labels_path}:{lineno}: {root / name} does not exist")
        by_name[name] = cls
    if not by_name:
        raise SourceError(f"{labels_path}: no 'filename,class_name' lines")
    classes = sorted(set(by_name.values()))
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = sorted((name, class_to_idx[cls]) for name, cls in by_name.items())
    samples.sort(key=lambda s: s[1])  # stable: by class, then by file name, as ImageFolder
    return Source(root, classes, samples)


def scan(root: str | os.PathLike, labels_file: str | os.PathLike | None = None) -> Source:
    """List ``root`` as an ImageFolder tree, or as a flat folder when ``labels_file`` is given."""
    return scan_imagefolder(root) if labels_file is None else scan_flat(root, labels_file)


def _existing_dir(root: str | os.PathLike) -> Path:
    path = Path(root)
    if not path.exists():
        raise SourceError(f"{path}: no such folder")
    if not path.is_dir():
        raise SourceError(f"{path}: not a folder")
    return path
