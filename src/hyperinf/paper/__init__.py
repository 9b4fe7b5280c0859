"""Runnable experiments, each callable from the ``hyperinf`` command line."""
