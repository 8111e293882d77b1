"""One module per pipeline stage: plain functions that do the work plus a thin Prefect task."""
