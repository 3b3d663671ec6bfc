"""The four-stage CPI-FT pipeline (probe → core → group → stages → fuse → consolidate → report)."""
