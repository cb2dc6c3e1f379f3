"""Criteo-format Parquet in, `Batch`es out.

A dataset folder holds `schema.json` and one folder of Parquet files per split; HugeCTR's
Parquet splits (a file list and `_metadata.json`) are read in place (`hugectr`). Every epoch
defines one global order of rows (row groups shuffled, rows shuffled inside each row group,
both seeded by the epoch), independent of the world size. Each rank takes an equal,
contiguous share of the rows not yet consumed, so ranks read disjoint row groups (shared
only at share boundaries), yield the same number of batches, and a resume on any world
size continues exactly where the run stopped.

Modules, in the order a batch flows through them: `schema` (column roles; no torch),
`layout` (where a split's files and schema come from), `checks` (what input is refused),
`order` (the epoch's row order and each rank's share; pure functions), `reader` (Parquet
row groups -> packed chunks of batches), `batch` (the `Batch` and its packing), `loader`
(worker processes and the shared memory they pack into). `scan` (`mmoe data check`) runs the
checks over a whole data set up front.
"""
