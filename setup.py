"""Build of the optional native kernel; all project metadata lives in pyproject.toml.

``micrograd._kernel`` is declared ``optional``: where no C compiler or no
Python headers are present, the build skips it with a warning and the
engine runs on its pure-Python kernel.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# IEEE results must hold: optimise hard but never with -ffast-math, and never
# fuse a*b+c into one rounding (the Python kernel rounds twice).
_UNIX_FLAGS = [
    "-O3",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-std=c11",
    # The sweeps are threaded interpreters: keep one dispatch per handler.
    "-fno-crossjumping",
    "-fno-gcse",
    "-falign-functions=64",
    "-falign-jumps=16",
]
_MSVC_FLAGS = ["/O2", "/fp:precise"]


class BuildNative(build_ext):
    """``build_ext`` with compiler flags picked for the compiler in use."""

    def build_extensions(self) -> None:
        """Add the optimisation flags that suit this compiler, then build."""
        flags = _MSVC_FLAGS if self.compiler.compiler_type == "msvc" else _UNIX_FLAGS
        for ext in self.extensions:
            ext.extra_compile_args = [*flags, *ext.extra_compile_args]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "micrograd._kernel",
            sources=[
                "engine/_kernel.c",
                "engine/_kernel_decode.c",
                "engine/_kernel_unpack.c",
                "engine/_kernel_pack.c",
            ],
            depends=["engine/_ops_list.h", "engine/_ops_math.h", "engine/_kernel_hvp.h",
                     "engine/_kernel_prog.h"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
