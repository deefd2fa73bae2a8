"""Build the optional C extension _bpe (see csrc/_bpe.c). Everything else is in pyproject.toml.
optional=True: without a working C compiler the install still succeeds and bpe.py runs in
pure Python. After editing csrc/, rebuild with `pip install -e .` (which puts _bpe*.so next to
bpe.py) or `python setup.py build_ext --inplace`; pip builds in the source tree, so delete a
stale build/ folder if a change does not seem to take."""
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
