"""Builds a C kernel of this package once per machine and loads it with ctypes.

CPU workers use a few C kernels where torch has no op that fits (attention straight from the paged pool). They
need no torch headers, so a build is two compiler calls of about a second (`cc -O3 -march=native -fopenmp`). The
library is cached under $RAYINFER_CACHE_DIR (default ~/.cache/rayinfer)/native, keyed by the source, the flags,
the compiler and this CPU's feature flags, and written by an atomic rename so concurrent workers can race safely.

Anything that goes wrong (no compiler, a failed build, a library that does not load) is logged once and the
caller gets None, meaning "use the torch path": the native kernels only make CPU runs faster, never possible.
RAYINFER_CPU_NATIVE=0 turns them off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from rayinfer.configs.cache_dir import cache_root

logger = logging.getLogger(__name__)

ENV_VAR = "RAYINFER_CPU_NATIVE"
# -ffast-math lets loops of expf vectorize (glibc's vector math) and sums reassociate into SIMD lanes; infinities
# stay meaningful (-fno-finite-math-only) because the online softmax starts from -inf. It is given to the compile
# step only: linked with -ffast-math, a shared library gets crtfastmath.o, whose constructor switches the loading
# thread to flush denormals to zero, which would change every later torch op of the process.
_COMPILE_FLAGS = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-fPIC"]
_LINK_FLAGS = ["-shared", "-fopenmp"]
_FLAG_SETS = (["-march=native", *_COMPILE_FLAGS], _COMPILE_FLAGS)  # the second for compilers without -march=native


def native_enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's flags line (a library built on another CPU may not run here)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:  # no /proc (not Linux): the processor's name is the best identity left
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(compiler: str, source: Path, flags: list[str], target: Path) -> bool:
    temporaries: list[str] = []
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".o", ".so"):
            fd, path = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=suffix, dir=target.parent)
            os.close(fd)
            temporaries.append(path)
        obj, lib = temporaries
        for command in (
            [compiler, *flags, "-c", "-o", obj, str(source)],
            [compiler, *_LINK_FLAGS, "-o", lib, obj, "-lm"],
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                logger.info("native kernel %s: %s failed: %s", source.name, " ".join(command), done.stderr[-2000:])
                return False
        os.replace(lib, target)
        return True
    except (OSError, subprocess.SubprocessError) as exc:  # an unwritable cache, a compiler that hangs
        logger.info("native kernel %s: build failed: %s", source.name, exc)
        return False
    finally:
        for path in temporaries:
            if os.path.exists(path):
                os.unlink(path)


@functools.lru_cache(maxsize=None)
def load_native_library(source_name: str) -> ctypes.CDLL | None:
    """The library built from kernels/<source_name>, or None when it cannot be built or loaded here."""
    if not native_enabled():
        return None
    # torch first: its libgomp must be the one loaded, so the kernel's OpenMP shares torch's thread pool.
    import torch  # noqa: F401

    source = Path(__file__).with_name(source_name)
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: CPU attention runs on the slower torch path")
        return None
    identity = [source.read_bytes(), _compiler_version(compiler).encode(), _cpu_features().encode(), platform.machine().encode()]
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(b"\0".join([*identity, " ".join(flags + _LINK_FLAGS).encode()])).hexdigest()[:16]
        target = cache_root() / "native" / f"{source.stem}-{digest}.so"
        if not target.is_file() and not _build(compiler, source, flags, target):
            continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as exc:
            logger.info("native kernel %s: %s does not load: %s", source_name, target, exc)
    logger.warning("native kernel %s could not be built: CPU attention runs on the slower torch path", source_name)
    return None
