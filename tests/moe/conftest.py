"""Make the numpy reference transcriptions next to these tests importable (pytest runs with --import-mode=importlib,
which does not put test folders on sys.path)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
