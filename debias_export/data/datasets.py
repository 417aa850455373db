"""Labelled inputs for activation capture, probing and evaluation: face images with attribute columns
(FairFace, UTKFace, PAIRS) and text prompts (one per line, or ``template,concept`` CSVs).

Both sources hold their rows in memory (cheap: file names and labels) and load images lazily, batch
by batch, so a capture's memory stays bounded by the batch size. Every user mistake -- a missing
column, a missing or unreadable image -- is a one-line :class:`~debias_export.core.errors.DebiasError`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.errors import DebiasError

DATA_ENV = "DEBIAS_EXPORT_DATA"


def default_data_dir() -> Path:
    """The shared data folder: ``$DEBIAS_EXPORT_DATA``, else ``<project root>/../shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DebiasError(f"{DATA_ENV}={env} is not a directory")
        return path.resolve()
    # In a checkout the project root is the parent of the package directory.
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data"
    if candidate.is_dir():
        return candidate
    raise DebiasError(f"no data directory: set {DATA_ENV} to the folder holding fairface540/, prompts/, ... "
                      f"(looked for {candidate})")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` when given (it must be a directory), else :func:`default_data_dir`."""
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise DebiasError(f"data directory {path} does not exist (pass --data or set {DATA_ENV})")
    return path


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A path as given, or -- when it does not exist and is relative -- the same path under the data dir.

    Lets users write ``fairface540/labels.csv`` instead of the full shared-data path.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    try:
        alt = default_data_dir() / p
    except DebiasError:
        return p
    return alt if alt.exists() else p


def read_csv_table(path: str | os.PathLike, what: str = "CSV file") -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a CSV, strictly: a row with more or fewer fields than the header, or a repeated
    column name, is an error naming the file and line (``csv.DictReader`` would drop extra fields or fill
    missing ones with None, silently). Blank lines are skipped; a UTF-8 BOM is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"{what} not found: {path}")
    rows: list[dict[str, str]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next((r for r in reader if r), [])
            dup = sorted({c for c in header if header.count(c) > 1})
            if dup:
                raise DebiasError(f"{path} line {reader.line_num}: column name(s) {', '.join(map(repr, dup))} repeated in the header")
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DebiasError(f"{path} line {reader.line_num}: {len(fields)} field(s) but the header has "
                                      f"{len(header)} ({', '.join(header)}); quote values that contain commas")
                rows.append(dict(zip(header, fields)))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DebiasError(f"cannot parse CSV {path}: {exc}") from None
    if not header:
        raise DebiasError(f"CSV {path} is empty (no header row)")
    return header, rows


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    return read_csv_table(path, "CSV file")


def is_missing_label(label: Any) -> bool:
    """The one rule for a missing label, everywhere labels group rows: None, NaN or a blank string."""
    return label is None or (isinstance(label, float) and math.isnan(label)) or str(label).strip() == ""


def labelled_indices(labels: Sequence[Any]) -> list[int]:
    """Indices of the rows whose label is present (see :func:`is_missing_label`); the rest are skipped."""
    return [i for i, lab in enumerate(labels) if not is_missing_label(lab)]


# 16-bit grayscale PNGs open in these modes; PIL's convert("RGB") clips them at 255 instead of scaling
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(img: Any, source: Any = "image") -> Any:
    """An RGB PIL image with 8 bits per channel; 16-bit grayscale is scaled (``round(v / 257)``), not clipped.

    Pillow opens 16-bit RGB(A) PNGs as 8-bit already; 16-bit grayscale stays ``I;16`` and ``convert("RGB")``
    would saturate every value above 255 (99.6% of a natural 16-bit image). 32-bit integer and float
    images have no known range and are refused.
    """
    mode = img.mode
    if mode in _WIDE_GRAY_MODES or (mode == "I" and getattr(img, "format", None) == "PNG"):
        arr = np.asarray(img).astype(np.uint32)  # PNG stores at most 16 bits per sample
        if arr.size and int(arr.max()) > 65535:
            raise DebiasError(f"cannot read image {source}: values above 65535 in a {mode} image")
        return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;") or mode.startswith("F;"):
        raise DebiasError(f"cannot read image {source}: {mode} ({'float' if mode.startswith('F') else '32-bit integer'}) "
                          "pixels have no known range; convert it to 8 or 16 bits per channel")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Any:
    """Open an image file as 8-bit RGB (see :func:`to_rgb`); an unreadable file is one error naming it."""
    try:
        with Image.open(path) as img:
            return to_rgb(img, path)  # converting forces the full decode inside the try
    except FileNotFoundError:
        raise DebiasError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DebiasError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _make_filter(filter: Any, header: Sequence[str], path: Path) -> Callable[[dict], bool] | None:
    if filter is None or callable(filter):
        return filter
    if not isinstance(filter, Mapping):
        raise DebiasError(f"filter must be a callable or a {{column: values}} mapping, got {type(filter).__name__}")
    allowed: dict[str, set[str]] = {}
    for col, values in filter.items():
        if col not in header:
            raise DebiasError(f"filter column {col!r} not in {path}; columns: {', '.join(header)}")
        allowed[col] = {values} if isinstance(values, str) else {str(v) for v in values}
    return lambda row: all(row[c] in vals for c, vals in allowed.items())


def _keep_rows(rows: list[dict], keep: Callable[[dict], bool] | None, limit: int | None) -> list[dict]:
    """Rows passing the filter, then the first ``limit`` of them."""
    if keep is not None:
        rows = [r for r in rows if keep(r)]
    if limit is not None:
        if limit < 0:
            raise DebiasError(f"limit must be >= 0, got {limit}")
        rows = rows[:limit]
    return rows


def _rows_digest(rows: list[dict]) -> str:
    """Hash of the selected rows (identifies the inputs in capture cache keys)."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


class LabelledImages:
    """Images named in a CSV column, with attribute columns kept as row metadata.

    ``image_dir`` defaults to ``<csv dir>/images`` when the files are there (FairFace, UTKFace), else the
    CSV's own directory (PAIRS writes ``occupations/airplane/black_man.png`` relative to it).
    ``columns`` picks the attribute columns (default: all but the file column); ``filter`` keeps rows
    (a callable on the row dict or ``{column: allowed values}``); ``limit`` keeps the first N after
    filtering. Every image file is checked to exist up front.
    """

    tower = "image"

    def __init__(self, csv_path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                 file_column: str = "file", columns: Sequence[str] | None = None, limit: int | None = None,
                 filter: Any = None):
        self.csv_path = Path(csv_path)
        header, rows = _read_csv(self.csv_path)
        if file_column not in header:
            raise DebiasError(f"file column {file_column!r} not in {self.csv_path}; columns: {', '.join(header)}")
        if columns is None:
            columns = [c for c in header if c != file_column]
        for col in columns:
            if col not in header:
                raise DebiasError(f"label column {col!r} not in {self.csv_path}; columns: {', '.join(header)}")
        self.file_column = file_column
        self.columns = list(columns)
        keep = _make_filter(filter, header, self.csv_path)
        rows = _keep_rows(rows, keep, limit)
        self.rows: list[dict[str, str]] = [{file_column: r[file_column], **{c: r[c] for c in self.columns}}
                                           for r in rows]
        self.image_dir = Path(image_dir) if image_dir is not None else self._guess_image_dir()
        if not self.image_dir.is_dir():
            raise DebiasError(f"image directory not found: {self.image_dir}")
        for row in self.rows:  # cheap os.path checks now, so a long capture does not die half-way
            if not row[file_column]:
                raise DebiasError(f"empty {file_column!r} value in {self.csv_path}")
            if not (self.image_dir / row[file_column]).is_file():
                raise DebiasError(f"image file not found: {self.image_dir / row[file_column]} (listed in {self.csv_path})")

    def _guess_image_dir(self) -> Path:
        base = self.csv_path.parent
        first = self.rows[0][self.file_column] if self.rows else None
        if first and (base / "images" / first).is_file():
            return base / "images"
        return base

    def __len__(self) -> int:
        return len(self.rows)

    def drop_unlabelled(self, columns: Sequence[str]) -> int:
        """Skip the rows whose label is missing in any of ``columns`` (:func:`is_missing_label`); return how many."""
        before = len(self.rows)
        self.rows = [r for r in self.rows if not any(is_missing_label(r.get(c)) for c in columns)]
        return before - len(self.rows)

    def path(self, i: int) -> Path:
        return self.image_dir / self.rows[i][self.file_column]

    def load(self, i: int):
        """Image ``i`` as an 8-bit RGB PIL image (16-bit scaled; unreadable file -> DebiasError naming it)."""
        return load_rgb(self.path(i))

    def batches(self, batch_size: int = 32, start: int = 0, stop: int | None = None) -> Iterator[tuple[list, list[dict]]]:
        """Yield ``(PIL images, row dicts)`` for rows ``start..stop`` in batches."""
        stop = len(self) if stop is None else min(stop, len(self))
        for b in range(start, stop, batch_size):
            idx = range(b, min(b + batch_size, stop))
            yield [self.load(i) for i in idx], [dict(self.rows[i]) for i in idx]

    def __iter__(self) -> Iterator[tuple[list, list[dict]]]:
        return self.batches()

    def describe(self) -> dict:
        """JSON summary recorded in capture manifests (rows digest identifies the selection)."""
        return {"kind": "images", "csv": str(self.csv_path.resolve()), "image_dir": str(self.image_dir.resolve()),
                "file_column": self.file_column, "columns": self.columns, "count": len(self),
                "rows_sha256": _rows_digest(self.rows)}


class TextPrompts:
    """Text prompts from a ``.txt`` file (one per non-empty line) or a CSV.

    CSV: ``template,concept`` columns are two lists (blank cells ignored) giving ``template.format(concept)``
    for every template x concept, concept-major (``pairing="rows"``: one prompt per row instead); a
    ``prompt`` / ``text`` column is used as is. Rows always carry the final string under ``"text"``.
    """

    tower = "text"

    def __init__(self, path: str | os.PathLike, limit: int | None = None, filter: Any = None, pairing: str = "cross"):
        if pairing not in ("cross", "rows"):
            raise DebiasError(f"unknown prompt pairing {pairing!r}; expected 'cross' or 'rows'")
        self.path = Path(path)
        self.pairing = pairing
        if not self.path.is_file():
            raise DebiasError(f"prompt file not found: {self.path}")
        if self.path.suffix.lower() == ".csv":
            header, raw = _read_csv(self.path)
            rows = self._csv_rows(header, raw)
            keep = _make_filter(filter, (["text", "template", "concept"] if "concept" in header else header + ["text"]), self.path)
        else:
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise DebiasError(f"cannot read {self.path} as UTF-8 text: {exc.reason}") from None
            rows = [{"text": line.strip()} for line in lines if line.strip()]
            keep = _make_filter(filter, ["text"], self.path)
        rows = _keep_rows(rows, keep, limit)
        self.rows: list[dict[str, str]] = rows

    def _csv_rows(self, header: list[str], raw: list[dict[str, str]]) -> list[dict[str, str]]:
        if "template" in header and "concept" in header:
            # The shared prompt CSVs hold two independent lists (7 templates, 41 concepts: blank cells pad
            # the shorter column); the prompts are every template applied to every concept, or, with
            # pairing="rows", one prompt per CSV row.
            if self.pairing == "rows":
                pairs = [(r["template"], r["concept"], n) for n, r in enumerate(raw, start=2)]
            else:
                templates = [(r["template"], n) for n, r in enumerate(raw, start=2) if r["template"].strip()]
                concepts = [r["concept"] for r in raw if r["concept"].strip()]
                pairs = [(t, c, n) for c in concepts for t, n in templates]
            rows = []
            for template, concept, n in pairs:
                try:
                    text = template.format(concept)
                except (IndexError, KeyError, ValueError) as exc:
                    raise DebiasError(f"{self.path} line {n}: template {template!r} cannot be formatted: {exc}") from None
                rows.append({"text": text, "template": template, "concept": concept})
            return rows
        for col in ("prompt", "text"):
            if col in header:
                return [{**r, "text": r[col]} for r in raw if r[col].strip()]
        raise DebiasError(f"prompt CSV {self.path} needs 'template' and 'concept' columns (or 'prompt' / 'text'); "
                          f"columns: {', '.join(header)}")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.rows]

    def batches(self, batch_size: int = 32, start: int = 0, stop: int | None = None) -> Iterator[tuple[list[str], list[dict]]]:
        """Yield ``(strings, row dicts)`` for rows ``start..stop`` in batches."""
        stop = len(self) if stop is None else min(stop, len(self))
        for b in range(start, stop, batch_size):
            rows = [dict(r) for r in self.rows[b:min(b + batch_size, stop)]]
            yield [r["text"] for r in rows], rows

    def __iter__(self) -> Iterator[tuple[list[str], list[dict]]]:
        return self.batches()

    def describe(self) -> dict:
        """JSON summary recorded in capture manifests."""
        return {"kind": "texts", "path": str(self.path.resolve()), "pairing": self.pairing, "count": len(self),
                "rows_sha256": _rows_digest(self.rows)}


def parse_where(items: Iterable[str]) -> dict[str, list[str]]:
    """CLI ``--where COL=V1,V2`` options -> ``{COL: [V1, V2]}`` (rows must match every column)."""
    out: dict[str, list[str]] = {}
    for item in items:
        col, sep, values = item.partition("=")
        if not sep or not col.strip():
            raise DebiasError(f"bad --where {item!r}: expected COLUMN=VALUE[,VALUE...]")
        out.setdefault(col.strip(), []).extend(v.strip() for v in values.split(","))
    return out
