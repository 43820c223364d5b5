"""The CPU kernels (ncps_mlx/runtime/cpu) as an MLX extension, built at install time.

Everything else about the package is in pyproject.toml. The extension is optional: where it
cannot be built (no C++ compiler, not Linux) the install still succeeds, says so once, and the
models run on MLX's operations (``python -m ncps_mlx info``). NCPS_MLX_BUILD_KERNELS=0 skips it.
"""

import os
import sys

from setuptools import setup

try:
    from mlx.extension import CMakeBuild, CMakeExtension
except ImportError:  # no mlx in the build environment: nothing to build against
    CMakeBuild = CMakeExtension = None


def _wanted() -> str | None:
    """Why the kernels are not built here, or None to build them."""
    if os.environ.get("NCPS_MLX_BUILD_KERNELS", "1") == "0":
        return "NCPS_MLX_BUILD_KERNELS=0"
    if not sys.platform.startswith("linux"):
        return "they are for Linux's CPU"
    if CMakeBuild is None:
        return "mlx is not installed in the build environment"
    return None


if _wanted() is None:

    class OptionalKernels(CMakeBuild):
        """CMakeBuild whose failure leaves the package without the kernels instead of failing."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # any build failure: the MLX path still works
                for extension in self.extensions:  # a stale build would run against the new sources
                    stale = self.get_ext_fullpath(extension.name)
                    if os.path.exists(stale):
                        os.remove(stale)
                self.warn(f"ncps_mlx: the CPU kernels were not built ({error}); the models will run on MLX's "
                          "operations (python -m ncps_mlx info)")  # fmt: skip

    options = {"ext_modules": [CMakeExtension("ncps_mlx.runtime.cpu._kernels", sourcedir="ncps_mlx/runtime/cpu")],
               "cmdclass": {"build_ext": OptionalKernels}}  # fmt: skip
else:
    print(f"ncps_mlx: the CPU kernels are not built: {_wanted()}", file=sys.stderr)
    options = {}

setup(**options)
