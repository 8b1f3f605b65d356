"""Datasets: Arrow schemas, validation with quarantine, the Llama 2 chat format, tokenisation and packing.

Pure Python and pyarrow: nothing here imports ray or mlflow (the Ray Data wiring lives in paddock.train.data).
"""
