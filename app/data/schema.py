"""Column roles of a dataset (`schema.json`) and the columns one run reads. No torch here:
converters that write data sets import this without the training stack."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from app.data.errors import DataError

SCHEMA_FILE = "schema.json"


def is_list(tp: pa.DataType) -> bool:
    """A list column: multi-hot ids."""
    return pa.types.is_list(tp) or pa.types.is_large_list(tp)


@dataclass
class Schema:
    """Column roles of a dataset, as written by the converters into `schema.json`."""

    labels: list[str]
    dense: list[str]
    categorical: dict[str, int]  # column -> cardinality (ids must lie in [0, cardinality))
    multi_hot: list[str] = field(default_factory=list)  # list<int> columns
    meta: dict = field(default_factory=dict)
    # keys in the files are id + offset (HugeCTR's slot offsets); from the config, not saved
    offsets: dict[str, int] = field(default_factory=dict)
    sizes_from: str = SCHEMA_FILE  # where a wrong cardinality is fixed, for error messages; not saved

    @classmethod
    def load(cls, dataset: str | Path) -> "Schema":
        path = Path(dataset) / SCHEMA_FILE
        if not path.exists():
            raise DataError(f"{path}: no schema file; prepare the data set first (`make data` for the census sample, or `mmoe data ...`)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: malformed schema, not JSON ({e}); rewrite it with the converter") from e
        check_schema_doc(raw, path)
        return cls(
            labels=list(raw["labels"]),
            dense=list(raw["dense"]),
            categorical={k: int(v["cardinality"]) for k, v in raw["categorical"].items()},
            multi_hot=[k for k, v in raw["categorical"].items() if v.get("multi_hot")],
            meta=raw.get("meta", {}),
        )

    def save(self, dataset: str | Path) -> None:
        cats = {
            k: {"cardinality": v, "multi_hot": k in self.multi_hot}
            for k, v in self.categorical.items()
        }
        doc = {"labels": self.labels, "dense": self.dense, "categorical": cats, "meta": self.meta}
        (Path(dataset) / SCHEMA_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def check_schema_doc(raw, path: Path) -> None:
    """The parsed `schema.json` has what `Schema.load` reads: label and dense name lists and
    a positive integer cardinality per categorical column, each column in one role only."""
    where = f"{path}: malformed schema"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in ("labels", "dense"):
        names = raw.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{where}: {key!r} must be a list of column names, got {names!r}")
    cats = raw.get("categorical")
    if not isinstance(cats, dict):
        raise DataError(f"{where}: 'categorical' must map column names to "
                        f"{{\"cardinality\": N}}, got {cats!r}")
    for name, spec in cats.items():
        card = spec.get("cardinality") if isinstance(spec, dict) else None
        if isinstance(card, bool) or not isinstance(card, int) or card < 1:
            raise DataError(f"{where}: categorical column {name!r} needs a positive integer "
                            f"cardinality, got {spec!r}")
    if not isinstance(raw.get("meta", {}), dict):
        raise DataError(f"{where}: 'meta' must be an object, got {raw['meta']!r}")
    seen: set[str] = set()
    for name in [*raw["labels"], *raw["dense"], *cats]:
        if name in seen:
            raise DataError(f"{where}: column {name!r} is listed twice; give each column one role")
        seen.add(name)



@dataclass(frozen=True)
class Columns:
    """The columns one run reads, in config order: labels (one per task), dense, categorical."""

    labels: tuple[str, ...]
    dense: tuple[str, ...]
    categorical: tuple[str, ...]
    cardinality: tuple[int, ...]
    multi_hot: frozenset[str] = frozenset()
    offsets: tuple[int, ...] = ()  # per categorical column, subtracted from its keys; (): none
    sizes_from: str = SCHEMA_FILE  # where the cardinalities are set (Schema.sizes_from)

    @classmethod
    def resolve(cls, schema: Schema, labels: list[str], dense: list[str], categorical: list[str],
                where: str) -> "Columns":
        """Config lists win; empty lists take every column of that role from the schema."""
        dense = dense or schema.dense
        categorical = categorical or list(schema.categorical)
        for role, names, known in (("label", labels, schema.labels), ("dense", dense, schema.dense),
                                   ("categorical", categorical, list(schema.categorical))):
            for name in names:
                if name not in known:
                    raise DataError(
                        f"{where}: the config names {role} column {name!r}, which the schema "
                        f"does not list as {role}; known: {', '.join(known) or 'none'}"
                    )
        return cls(
            labels=tuple(labels),
            dense=tuple(dense),
            categorical=tuple(categorical),
            cardinality=tuple(schema.categorical[c] for c in categorical),
            multi_hot=frozenset(c for c in categorical if c in schema.multi_hot),
            offsets=tuple(schema.offsets.get(c, 0) for c in categorical) if schema.offsets else (),
            sizes_from=schema.sizes_from,
        )

    @property
    def all(self) -> list[str]:
        return [*self.labels, *self.dense, *self.categorical]
