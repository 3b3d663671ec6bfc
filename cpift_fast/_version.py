"""The version of cpift_fast: the one place it is written.

pyproject.toml reads it (``[tool.setuptools.dynamic]``), ``cpift_fast.__version__`` and
``cpift --version`` import it. No imports here: setuptools reads the file without running torch.
"""

__version__ = "0.1.0"
