"""Converters and generators that write data sets in our layout (`schema.json` plus one folder
of Parquet files per split), apart from the training path. Each module is one source and
registers its `mmoe data <source>` command with `add_data_command(subparsers)`; `tsv` (text
input in ranges) and `row_groups` (exact-size row groups) are helpers they share. They import
`app.data.schema` and `app.data.errors` only, not torch."""
