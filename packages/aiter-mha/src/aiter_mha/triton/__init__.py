"""Triton backend of aiter-mha: the kernels (fwd.py, bwd.py, with the score / mask helpers they share in
masking.py), the launch-config tables (configs.py) and launch.py, which turns an op's Call into launches.

Importing this package imports nothing else: ``launch`` imports Triton and the kernels."""
