"""Read dataset files into plain records, remembering where each record came from.

Every record is a `Record` (a dict) whose `origin` names its file and line, row or item,
so that any later complaint about it can point at the exact place to fix.
Supported sources: .jsonl, .json (a list of objects, or an object holding one such list),
.csv, .tsv, .parquet, and folders written by `datasets.Dataset.save_to_disk` (or a
`DatasetDict`). Line numbers are 1-based; row and item indices are 0-based.
"""
from __future__ import annotations

import csv
import glob
import importlib
import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from peftlab.errors import PeftlabError

SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet, or a folder saved with datasets' save_to_disk"


class DataError(PeftlabError, ValueError):
    """A dataset problem a person can fix; the message is one sentence naming the place."""


class Record(dict):
    """One example as read from disk; `origin` says where, e.g. 'train.jsonl, line 7'."""

    __slots__ = ("origin",)

    def __init__(self, data: dict, origin: str):
        super().__init__(data)
        self.origin = origin


def load_records(source: str | Path | Sequence[str | Path | dict], *, split: str | None = None
                 ) -> list[Record]:
    """Read one source, a glob pattern, or a list of them (or a list of dicts) into records.

    `split` picks a split of a saved `DatasetDict` folder (default: 'train' if present).
    Raises `DataError` for missing, unreadable, malformed or empty input.
    """
    if isinstance(source, (str, Path)):
        sources: list[Any] = [source]
    else:
        sources = list(source)
    if not sources:
        raise DataError("no dataset given: pass a file, a folder, a glob pattern or a list of records")
    records: list[Record] = []
    for index, item in enumerate(sources):
        if isinstance(item, dict):
            records.append(Record(item, f"record {index}"))
        elif isinstance(item, (str, Path)):
            for path in _expand(item):
                records.extend(_read_path(path, split))
        else:
            raise DataError(f"dataset entry {index} is a {type(item).__name__}: expected a path or a dict")
    if not records:
        raise DataError(f"{_names(sources)}: no records found (the dataset is empty)")
    return records


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Carve a deterministic eval split of `fraction` of the records; the rest keep their order."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {fraction}")
    count = round(len(records) * fraction)
    if count == 0 or count == len(records):
        raise DataError(f"eval_fraction {fraction} of {len(records)} records leaves "
                        f"{'no eval' if count == 0 else 'no train'} examples; "
                        "give more data, change eval_fraction, or pass a separate eval file")
    chosen = set(random.Random(f"eval-split:{seed}").sample(range(len(records)), count))
    train = [r for i, r in enumerate(records) if i not in chosen]
    evaluation = [r for i, r in enumerate(records) if i in chosen]
    return train, evaluation


def _names(sources: Iterable[Any]) -> str:
    return ", ".join(str(s) if not isinstance(s, dict) else "records" for s in sources)


def _expand(item: str | Path) -> list[Path]:
    path = Path(item)
    if path.exists():
        return [path]
    if glob.has_magic(str(item)):
        matches = sorted(Path(p) for p in glob.glob(str(item)))
        if not matches:
            raise DataError(f"{item}: the pattern matches no files")
        return matches
    raise DataError(f"{item}: no such file or folder")


def _read_path(path: Path, split: str | None) -> list[Record]:
    if path.is_dir():
        return _read_saved_dataset(path, split)
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
               ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix or '(none)'}'; use {SUPPORTED}")
    try:
        records = reader(path)
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file ({_reason(err)})") from None
    if not records:
        raise DataError(f"{path}: the file holds no records (empty dataset)")
    return records


def _reason(err: BaseException) -> str:
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text: byte {err.start} cannot be decoded"
    return getattr(err, "strerror", None) or str(err).splitlines()[0]


def _as_record(value: Any, origin: str) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{origin}: expected a JSON object with named fields, got {_json_type(value)}")
    return Record(value, origin)


def _json_type(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{path}, line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{origin}: invalid JSON ({err.msg} at column {err.colno})") from None
            records.append(_as_record(value, origin))
    return records


def _read_json(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: invalid JSON ({err.msg} at column {err.colno}); "
                        "a .json file holds one JSON list of objects (use .jsonl for one object per line)"
                        ) from None
    if isinstance(value, dict):
        lists = [key for key, inner in value.items() if isinstance(inner, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects, or an object with exactly one list "
                            f"field (such as 'data'), but found list fields {lists or 'none'}")
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {_json_type(value)}")
    return [_as_record(item, f"{path}, item {i}") for i, item in enumerate(value)]


def _read_csv(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            start = 2   # line 1 is the header
            for row in reader:
                cells = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                if cells != len(reader.fieldnames):   # DictReader pads short rows and gathers extra cells
                    raise DataError(f"{path}, line {start}: the row has {cells} cells but the header "
                                    f"names {len(reader.fieldnames)} columns")
                records.append(Record(row, f"{path}, line {start}"))
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({err})") from None
    return records


def _optional(module: str, path: Path, what: str) -> Any:
    """Import a package needed for one input kind only, or say which one to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading {what} needs the '{module.split('.')[0]}' package "
                        f"(pip install {module.split('.')[0]})") from None


def _read_parquet(path: Path) -> list[Record]:
    pq = _optional("pyarrow.parquet", path, "parquet files")

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    return [Record(row, f"{path}, row {i}") for i, row in enumerate(rows)]


def _read_saved_dataset(path: Path, split: str | None) -> list[Record]:
    datasets = _optional("datasets", path, "a saved dataset folder")

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: a folder must be a dataset saved with datasets' save_to_disk "
                        f"(no dataset_info.json or dataset_dict.json inside); otherwise use {SUPPORTED}"
                        ) from None
    where = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded.keys())
        chosen = split or ("train" if "train" in loaded else None)
        if chosen not in loaded:
            wanted = f"split '{split}' not found" if split else "several splits and none is 'train'"
            raise DataError(f"{path}: {wanted}; choose one of: {', '.join(names)}")
        loaded, where = loaded[chosen], f"{path} [{chosen}]"
    return [Record(row, f"{where}, row {i}") for i, row in enumerate(loaded.to_list())]
