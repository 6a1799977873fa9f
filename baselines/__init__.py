"""Optuna-searched fixed-size baselines (docs/baselines.md).

    search.py         `growbench search`: one study per suite and dataset, workers, storage, best files
    space.py          search spaces (spaces/<family>.yaml, spaces/<suite>.yaml) -> trial configurations
    storage_check.py  `python -m baselines.storage_check`: does a storage hold under K worker processes?
    spaces/           the search spaces
    best/             the best configuration of each searched suite and dataset (written by searches)
"""
