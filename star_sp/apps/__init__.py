"""The applications built on the library: the ``star-sp`` command (``cli.py``: generate and eval), its TOML
run configs, W&B tracking, and the training jobs (``jobs/``). Nothing in the library imports from here."""
