"""cpmv-batch: Ray Data pipeline from object storage to Parquet with the MiniCPM-V family."""

__version__ = "0.1.0"
