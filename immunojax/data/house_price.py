"""The condition-number paper's house-price tasks (Kaggle Ames housing).

D_P = rows with ``MSZoning != "RL"`` labelled ``LotArea``; D_H = ``RL`` rows
labelled ``SalePrice``; 79 features (every column but the two labels, ``Id``
included). Preprocessing follows the released code (spec cond_num.md §5.1):
per split ``fillna(0)``, per-split alphabetical label codes for text columns,
z-scores over the whole split (ddof=1, zero std -> 1), float32 tensors. Item
``i`` pairs D_P row ``i`` with D_H row ``i``; items 0-199 train, 200-299
held out.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

LABEL_P, LABEL_H = "LotArea", "SalePrice"
NUM_TRAIN, NUM_HELDOUT = 200, 100


class HousePrice(NamedTuple):
  """Arrays of the two tasks; ``*_train`` are items 0-199, ``*_test`` 200-299."""
  xp_train: np.ndarray
  yp_train: np.ndarray
  xh_train: np.ndarray
  yh_train: np.ndarray
  xp_test: np.ndarray
  yp_test: np.ndarray
  xh_test: np.ndarray
  yh_test: np.ndarray
  feature_names: tuple[str, ...]


def _is_text(col) -> bool:
  return col.dtype == object or str(col.dtype) in ("category", "string", "str")


def _preprocess(frame, label: str):
  features = [c for c in frame.columns if c not in (LABEL_P, LABEL_H)]
  cols = []
  for c in features:
    col = frame[c]
    if _is_text(col):  # the code's fillna(0) then astype(str): NaN -> "0"
      text = col.astype(object).where(col.notna(), "0").astype(str)
      _, codes = np.unique(text.to_numpy(), return_inverse=True)
      cols.append(codes.astype(np.float64))
    else:
      cols.append(col.fillna(0).to_numpy(dtype=np.float64))
  x = np.stack(cols, axis=1)
  std = x.std(axis=0, ddof=1)
  x = (x - x.mean(axis=0)) / np.where(std == 0, 1.0, std)
  y = frame[label].fillna(0).to_numpy(dtype=np.float64)
  ys = y.std(ddof=1)
  y = (y - y.mean()) / (ys if ys else 1.0)
  return x.astype(np.float32), y.astype(np.float32), tuple(features)


def _numeric_cells_that_fail(col) -> list[int]:
  """Row positions of a text column's cells that are not numbers, when
  nearly all of its cells are (a numeric column with a bad cell)."""
  import pandas as pd  # noqa: PLC0415
  present = col.dropna()
  if present.empty:
    return []
  parsed = pd.to_numeric(present, errors="coerce")
  bad = parsed.isna()
  if bad.mean() > 0.1:      # a genuine text column (e.g. MSZoning)
    return []
  return list(present.index[bad])


def validate(frame, path: Path) -> None:
  """The schema the loader relies on; raises ValueError naming the file, the
  CSV line and the column of the first problem."""
  missing = {"MSZoning", LABEL_P, LABEL_H} - set(frame.columns)
  if missing:
    raise ValueError(f"{path} lacks column(s) {sorted(missing)}")
  for c in frame.columns:
    col = frame[c]
    if _is_text(col):
      rows = _numeric_cells_that_fail(col)
      if rows or c in (LABEL_P, LABEL_H):
        rows = rows or list(col.index[col.notna()][:1])
        r = rows[0]
        raise ValueError(
            f"{path} line {r + 2}, column {c!r}: {col[r]!r} is not a number "
            f"(the column is numeric{'' if len(rows) == 1 else f'; {len(rows)} such cells'})")
  for name, rows in (("D_P (MSZoning != 'RL')", frame["MSZoning"] != "RL"),
                     ("D_H (MSZoning == 'RL')", frame["MSZoning"] == "RL")):
    n = int(rows.sum())
    if n < NUM_TRAIN + NUM_HELDOUT:
      raise ValueError(
          f"{path} has {n} rows for {name}; the task needs at least "
          f"{NUM_TRAIN + NUM_HELDOUT} ({NUM_TRAIN} train + {NUM_HELDOUT} "
          "held out)")


def load_house_price(data_dir: str | Path) -> HousePrice:
  """Reads ``train.csv`` from ``data_dir`` and builds both tasks.

  Raises:
    FileNotFoundError: naming the missing file.
    ValueError: the CSV does not have the schema the tasks need (missing
      columns, a non-number in a numeric column, too few rows), naming the
      file, line and column.
  """
  path = Path(data_dir) / "train.csv"
  if not path.exists():
    raise FileNotFoundError(
        f"house-price data: {path} not found. Point --data-dir at the folder "
        "holding the Kaggle train.csv (e.g. ../shared/data/house_price)")
  import pandas as pd  # noqa: PLC0415
  try:
    frame = pd.read_csv(path)
  except (ValueError, pd.errors.ParserError) as e:
    raise ValueError(f"{path} is not a readable CSV ({e})") from None
  validate(frame, path)
  d1 = frame[frame["MSZoning"] != "RL"].reset_index(drop=True)
  d2 = frame[frame["MSZoning"] == "RL"].reset_index(drop=True)
  xp, yp, names = _preprocess(d1, LABEL_P)
  xh, yh, _ = _preprocess(d2, LABEL_H)
  tr = slice(0, NUM_TRAIN)
  te = slice(NUM_TRAIN, NUM_TRAIN + NUM_HELDOUT)
  return HousePrice(xp[tr], yp[tr], xh[tr], yh[tr], xp[te], yp[te], xh[te],
                    yh[te], names)
