"""Local file-list layouts: DenseDepth CSVs (`rgb,depth` per line) and BTS filenames files (`rgb depth focal`).

Splits of a folder come from its list files' names: a name containing `train`, `val` or `test` belongs to that split
(`train`, `validation`, `test`). A folder whose only list names no split (e.g. `index.csv`) is a single-split
folder: its frames are served for each standard split name (`train`, `validation`, `test`, and the aliases `val`
and `eval`), so one folder of frames can be trained and evaluated on; any other split name is an error.

List files may carry a UTF-8 byte-order mark and CRLF line endings. Each path is taken as given when absolute and
present, otherwise relative to (in this order) `data_root`, the list's folder and the folders DenseDepth and BTS
put frames in. Every file that is not found is named in one error.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Sequence

__all__ = [
    "STANDARD_SPLITS", "find_split_lists", "normalise_split", "read_bts_list", "read_densedepth_csv", "select_split",
    "split_error",
]

STANDARD_SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "eval": "test"}
_MAX_LISTED = 10


def normalise_split(split: str) -> str:
    return _SPLIT_ALIASES.get(split, split)


def _split_of(filename: str) -> str | None:
    """The split named in a list file's name (`nyu2_train.csv` -> train), or None for an unsplit list."""
    words = re.split(r"[^a-z]+", Path(filename).stem.lower())
    for word in words:
        if word == "train":
            return "train"
        if word in ("val", "valid", "validation"):
            return "validation"
        if word in ("test", "eval"):
            return "test"
    return None


def _is_image_path(text: str) -> bool:
    return bool(re.search(r"\.(png|jpe?g|tiff?|bmp|npy)$", text.strip(), re.IGNORECASE))


def find_split_lists(folder: Path) -> tuple[str, dict[str, Path], Path | None]:
    """`(layout, {split: list file}, unsplit list)` of a folder; layout is "densedepth", "bts" or "" (none)."""
    csvs = sorted(folder.glob("*.csv")) or sorted((folder / "data").glob("*.csv"))
    if csvs:
        return ("densedepth", *_group_by_split(csvs, folder))
    for base in (folder, folder / "train_test_inputs", folder.parent / "train_test_inputs", folder.parent):
        if not base.is_dir():
            continue
        lists = sorted(p for p in base.glob("*.txt") if "file" in p.name.lower() and _split_of(p.name))
        if lists:
            # BTS ships lists with and without ground truth; the `_with_gt` one is the evaluation list
            by_split: dict[str, list[Path]] = {}
            for path in lists:
                by_split.setdefault(_split_of(path.name), []).append(path)
            chosen = {s: next((p for p in ps if "with_gt" in p.name), ps[0]) for s, ps in by_split.items()}
            return "bts", chosen, None
    return "", {}, None


def _group_by_split(lists: Sequence[Path], folder: Path) -> tuple[dict[str, Path], Path | None]:
    by_split: dict[str, list[Path]] = {}
    unsplit: list[Path] = []
    for path in lists:
        split = _split_of(path.name)
        (by_split.setdefault(split, []) if split else unsplit).append(path)
    for split, paths in by_split.items():
        if len(paths) > 1:
            raise ValueError(
                f"folder {folder} has several lists for split {split!r} ({', '.join(p.name for p in paths)}); "
                "pass the list file itself"
            )
    if by_split:
        return {s: ps[0] for s, ps in by_split.items()}, None  # unsplit extras (e.g. a notes.csv) are ignored
    if len(unsplit) > 1:
        raise ValueError(
            f"folder {folder} has several CSV files ({', '.join(p.name for p in unsplit)}) and none names a split "
            "(train/val/test); pass the CSV file itself"
        )
    return {}, unsplit[0]


def split_error(split: str, source: str, available: Sequence[str]) -> ValueError:
    return ValueError(f"split {split!r} not in {source} (splits: {sorted(available)})")


def select_split(split: str, lists: dict[str, Path], unsplit: Path | None, source: str) -> Path:
    """The list file serving `split` (see the module docstring), or an error naming the splits that exist."""
    wanted = normalise_split(split)
    if wanted in lists:
        return lists[wanted]
    if unsplit is not None and wanted in STANDARD_SPLITS:
        return unsplit
    if unsplit is None:
        raise split_error(split, source, lists)
    raise ValueError(
        f"split {split!r} not in {source} (one unsplit list {unsplit.name}, served as any of {list(STANDARD_SPLITS)})"
    )


def _resolve(entry: str, bases: Sequence[Path]) -> tuple[Path | None, str]:
    """The file an entry names (absolute, or relative to one of `bases`) and the frame's name."""
    entry = entry.strip()
    if os.path.isabs(entry) and os.path.isfile(entry):
        path = Path(entry)
        for base in bases:
            try:
                return path, _strip_ext(path.relative_to(base).as_posix())
            except ValueError:
                continue
        return path, _strip_ext(path.name)
    # BTS writes paths relative to its data folders with a leading slash
    relative = entry.lstrip("/\\")
    for base in bases:
        if (base / relative).is_file():
            return base / relative, _strip_ext(relative)
    return None, _strip_ext(relative)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _strip_ext(text: str) -> str:
    return re.sub(r"\.[^./]+$", "", text)


def _missing_error(list_file: Path, missing: list[tuple[int, str]], bases: Sequence[Path]) -> FileNotFoundError:
    shown = "; ".join(f"line {line}: {entry}" for line, entry in missing[:_MAX_LISTED])
    more = f"; and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    where = ", ".join(str(b) for b in bases)
    return FileNotFoundError(
        f"{list_file}: {len(missing)} listed file(s) not found ({shown}{more}); relative paths were looked up in {where}"
    )


def _read_pairs(list_file: Path, rows, bases: Sequence[Path], skip_header: bool):
    pairs, names, missing = [], [], []
    for line_no, row in rows:
        if skip_header and not pairs and not missing and not _is_image_path(row[0]):
            continue
        rgb, name = _resolve(row[0], bases)
        depth, _ = _resolve(row[1], bases)
        for path, entry in ((rgb, row[0]), (depth, row[1])):
            if path is None:
                missing.append((line_no, entry.strip()))
        if rgb is not None and depth is not None:
            pairs.append((str(rgb), str(depth)))
            names.append(name)
    if missing:
        raise _missing_error(list_file, missing, bases)
    if not pairs:
        raise ValueError(f"no samples listed in {list_file}")
    return pairs, names


def _dedupe(paths: Sequence[Path | None]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path is not None and path not in out:
            out.append(path)
    return out


def read_densedepth_csv(csv_path: Path, data_root: Path | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """`([(rgb, depth)], [name])` of a DenseDepth CSV (an optional header line is skipped)."""
    # DenseDepth's own CSVs (data/nyu2_train.csv) list paths like "data/nyu2_train/...", relative to the CSV's parent
    bases = _dedupe([data_root, csv_path.parent, csv_path.parent.parent])
    rows = []
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            row = [c.strip() for c in row if c.strip()]
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"{csv_path}:{line_no}: expected 'rgb_path,depth_path', got {','.join(row)!r}")
            rows.append((line_no, row))
    return _read_pairs(csv_path, rows, bases, skip_header=True)


def read_bts_list(
    list_file: Path, folder: Path, data_root: Path | None = None
) -> tuple[list[tuple[str, str]], list[str]]:
    """`([(rgb, depth)], [name])` of a BTS filenames file; frames listed without ground truth (`None`) are left out."""
    bases = _dedupe([
        data_root, folder / "sync", folder / "official_splits" / "test", folder / "official_splits" / "train",
        folder, list_file.parent,
    ])
    rows = []
    with open(list_file, newline="", encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if not 2 <= len(fields) <= 3 or (len(fields) == 3 and not _is_number(fields[2])):
                # a path with a space in it splits into more fields: the format cannot hold it
                raise ValueError(
                    f"{list_file}:{line_no}: line does not fit the format 'rgb depth [focal]' (2 or 3 fields "
                    f"separated by spaces, the focal length a number), got {len(fields)} field(s): {line.strip()!r}"
                )
            if fields[1] != "None":
                rows.append((line_no, fields))
    if not rows:
        raise ValueError(f"no samples with ground truth listed in {list_file}")
    return _read_pairs(list_file, rows, bases, skip_header=False)
