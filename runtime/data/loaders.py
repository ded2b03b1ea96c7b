"""Read dataset files into records: json, jsonl, parquet, csv, folders of them, s3://, HF ids.

JSON and CSV are parsed here (not through `datasets`) so that a malformed line is reported with
its file and line number; parquet goes through pyarrow. Hugging Face dataset ids go through
`datasets.load_dataset` and fail with a clear message when no hub is reachable.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

from ..api.errors import DataError
from ..api.spec import DatasetSpec

SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}", str(path)) from None
        if not all(isinstance(r, dict) for r in data):
            raise DataError("expected a JSON array of objects (one object per sample)", str(path))
        return data
    return _read_jsonl(path, text)


def _read_jsonl(path: Path, text: str | None = None) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8") if text is None else text
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON on line {lineno}: {err.msg} (column {err.colno})", str(path)) from None
        if not isinstance(record, dict):
            raise DataError(f"line {lineno} is not a JSON object", str(path))
        records.append(record)
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read parquet: {err}", str(path)) from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        try:
            return [dict(row) for row in csv.DictReader(f)]
        except csv.Error as err:
            raise DataError(f"malformed CSV: {err}", str(path)) from None


READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def read_file(path: Path) -> list[dict[str, Any]]:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}", str(path))
    return reader(path)


def read_local(path: Path) -> list[dict[str, Any]]:
    """A file, or every supported file in a folder (sorted, recursive)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"the folder has no {', '.join(SUFFIXES)} files", str(path))
        records: list[dict[str, Any]] = []
        for f in files:
            records.extend(read_file(f))
        return records
    return read_file(path)


def _looks_like_hub_id(source: str) -> bool:
    if source.startswith("hf://"):
        return True
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")) and "." not in parts[-1]


def resolve_source(source: str, base_dir: Path | None = None) -> Path | str:
    """A local Path for file:// and plain paths (relative to `base_dir`), or the source unchanged."""
    if source.startswith("file://"):
        return Path(source[len("file://"):])
    if source.startswith(("s3://", "hf://")):
        return source
    p = Path(source).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def load_records(ds: DatasetSpec, base_dir: Path | None = None, fetch: Callable[[str], Path] | None = None) -> list[dict[str, Any]]:
    """All records of one dataset, limited to `maxSamples`. Raises DataError naming the dataset.

    `fetch` turns an s3:// URI into a local path (the storage layer's cache); `base_dir` is where
    relative paths are resolved (the job file's folder in local mode).
    """
    where = f"dataset {ds.name!r} ({ds.source})"
    resolved = resolve_source(ds.source, base_dir)
    if isinstance(resolved, str) and resolved.startswith("s3://"):
        if fetch is None:
            raise DataError("s3:// sources need storage settings (spec.storage)", where)
        resolved = fetch(resolved)
    if isinstance(resolved, Path):
        if resolved.exists():
            records = read_local(resolved)
        elif _looks_like_hub_id(ds.source):
            records = _load_hub(ds, where)
        else:
            raise DataError(f"file not found: {resolved}", where)
    else:
        records = _load_hub(ds, where)
    if ds.max_samples is not None:
        records = records[: ds.max_samples]
    if not records:
        raise DataError("the dataset is empty", where)
    return records


def _load_hub(ds: DatasetSpec, where: str) -> list[dict[str, Any]]:
    import datasets

    name = ds.source.removeprefix("hf://")
    try:
        loaded = datasets.load_dataset(name, split=ds.split)
    except Exception as err:  # offline, unknown id, gated, missing split: all the same to the user
        raise DataError(
            f"cannot load Hugging Face dataset {name!r} (split {ds.split!r}): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. Is the hub reachable? For offline use, "
            "point `source` at a local file or an s3:// URI.",
            where,
        ) from None
    return list(loaded)


BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def stream_records(ds: DatasetSpec, base_dir: Path | None = None, fetch: Callable[[str], Path] | None = None):
    """A dataset with `streaming: true` as a `datasets.IterableDataset` of records: read a batch at
    a time, never whole (load_dataset(..., streaming=True)); `maxSamples` takes the first N."""
    import datasets

    where = f"dataset {ds.name!r} ({ds.source})"
    resolved = resolve_source(ds.source, base_dir)
    if isinstance(resolved, str) and resolved.startswith("s3://"):
        if fetch is None:
            raise DataError("s3:// sources need storage settings (spec.storage)", where)
        resolved = fetch(resolved)  # to the local disk cache, not into memory
    if isinstance(resolved, Path) and resolved.exists():
        files = sorted(p for p in resolved.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()) \
            if resolved.is_dir() else [resolved]
        kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
        if not files or None in kinds or len(kinds) != 1:
            raise DataError(f"streaming reads files of one type ({', '.join(SUFFIXES)}); found "
                            f"{sorted(f.suffix for f in files) or 'none'}", where)
        stream = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train", streaming=True)
    elif isinstance(resolved, Path) and not _looks_like_hub_id(ds.source):
        raise DataError(f"file not found: {resolved}", where)
    else:
        name = ds.source.removeprefix("hf://")
        try:
            stream = datasets.load_dataset(name, split=ds.split, streaming=True)
        except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: all the same to the user
            raise DataError(f"cannot stream Hugging Face dataset {name!r} (split {ds.split!r}): "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", where) from None
    return stream.take(ds.max_samples) if ds.max_samples is not None else stream
