"""A directory put first on PYTHONPATH in boxes, for its sitecustomize.py (not imported on the host)."""
