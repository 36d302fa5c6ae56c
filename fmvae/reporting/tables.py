"""Tables written as csv (every digit) and markdown (three decimals), each atomically."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fmvae.io import atomic_write_text


def write_table(df: pd.DataFrame, stem: Path) -> None:
    """The same table as stem.csv and stem.md, each written atomically."""
    atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    blanks = df.astype(object).where(df.notna(), None)  # an empty cell, not "nan", where a value is missing
    atomic_write_text(stem.with_suffix(".md"), blanks.to_markdown(index=False, floatfmt=".3f", missingval="") + "\n")
