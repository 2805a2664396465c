"""Pure functions over pyarrow tables for the `filter` phase (no I/O, no Ray, no MLflow).

- `schema`: LAION variants -> one normalised schema; `uid` per row.
- `filters`: each filter `(table, cfg) -> (keep_mask, reason)`, a registry, exact funnel accounting.
- `dedup`: URL normalisation, hash buckets, keep-best-per-URL with a deterministic tie rule.
- `hashing`: stable BLAKE2b-64 hashes of string columns.
"""
