"""Build the optional C extension _bpe (see csrc/_bpe.c). Everything else is in pyproject.toml.
optional=True: without a working C compiler the install still succeeds and bpe.py runs in
pure Python."""
import sys

from setuptools import Extension, setup

compile_args = [] if sys.platform == "win32" else ["-O3"]
setup(
    ext_modules=[
        Extension(
            "_bpe",
            sources=["csrc/_bpe.c"],
            depends=["csrc/_bpe_tables.h"],
            extra_compile_args=compile_args,
            optional=True,
        )
    ]
)
