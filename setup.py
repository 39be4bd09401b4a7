"""Builds shmq's native ring engine.

SHMQ_SANITIZE=address,undefined builds it with those sanitizers (for CI jobs
that run the suite under ASan/UBSan; LD_PRELOAD the runtime when running it).
SHMQ_DEBUG=1 builds without optimisation and with assertions.
"""

import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class AtomicBuildExt(build_ext):  # type: ignore[misc]
    """In-place builds replace the .so atomically: a running process that has the
    old one mapped keeps its inode instead of seeing it truncated under it."""

    def copy_file(self, infile, outfile, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.inplace:
            return super().copy_file(infile, outfile, *args, **kwargs)
        tmp = f"{outfile}.tmp{os.getpid()}"
        shutil.copyfile(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, True


compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-fno-strict-aliasing"]
link_args: list[str] = []
sanitize = os.environ.get("SHMQ_SANITIZE", "").strip()
if sanitize:
    compile_args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g", "-O1"]
    link_args += [f"-fsanitize={sanitize}"]
elif os.environ.get("SHMQ_DEBUG"):
    compile_args += ["-O0", "-g", "-UNDEBUG"]
else:
    compile_args += ["-O2"]

setup(
    cmdclass={"build_ext": AtomicBuildExt},
    ext_modules=[
        Extension(
            "shmq._native._ring",
            sources=[
                "shmq/_native/_ringmodule.c",
                "shmq/_native/ring.c",
                "shmq/_native/bus.c",
                "shmq/_native/log.c",
                "shmq/_native/hist.c",
            ],
            depends=[
                "shmq/_native/ring.h",
                "shmq/_native/bus.h",
                "shmq/_native/log.h",
                "shmq/_native/_pubsub.c",
                "shmq/_native/_log.c",
                "shmq/_native/_hist.c",
                "shmq/_native/hist.h",
            ],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
)
