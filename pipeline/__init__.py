"""cpmv-batch: Ray Data pipeline from object storage to Parquet with the MiniCPM-V family.

The Python API (pipeline/api.py): `load_job`, `run_job`, `process_dataset`. They are imported on
first use, so `import pipeline` (and the `cpmv` command's start) stays light.
"""

__version__ = "0.1.0"

__all__ = ["load_job", "load_job_data", "run_job", "process_dataset"]


def __getattr__(name: str):
    if name in __all__:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
