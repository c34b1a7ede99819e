"""Builds the CPU kernels at install time: mvlp_jax/kernels/mkl_kernels.cc against the pinned jaxlib's XLA FFI
headers, into mvlp_jax/kernels/_mkl_kernels*.so. Everything else is declared in pyproject.toml.

The build is optional: without a C++ compiler the install still succeeds and the CPU programs run on XLA's own
ops. The library links nothing; MKL's entry points are handed to it at load time (kernels/cpu_blas.py), from the
`mkl` package of the `cpu` extra.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildKernels(build_ext):
    """Adds jaxlib's FFI include folder (a build requirement, importable only once the build starts)."""

    def build_extensions(self) -> None:
        import jaxlib

        include = f"{jaxlib.__path__[0]}/include"
        for extension in self.extensions:
            extension.include_dirs.append(include)
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            name="mvlp_jax.kernels._mkl_kernels",
            sources=["mvlp_jax/kernels/mkl_kernels.cc"],
            language="c++",
            extra_compile_args=["-O2", "-std=c++17", "-w"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildKernels},
)
