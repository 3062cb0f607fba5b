"""The test suite; :mod:`tests.helpers` holds what several test modules (and ``tests/distributed_run.py``) share."""
