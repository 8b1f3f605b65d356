"""Convert datasets in public formats into paddock's Parquet: python jobs/import_data.py --config jobs/configs/byo/import_data.yaml"""

import sys

from paddock.cli import run_stage
from paddock.config import ImportJob
from paddock.data import importers

if __name__ == "__main__":
    sys.exit(run_stage(ImportJob, importers.run, __doc__))
