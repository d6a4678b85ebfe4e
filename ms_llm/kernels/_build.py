"""Build the CPU C++ kernels under ``ms_llm/kernels/csrc/`` into a shared library, once per machine.

The library is cached in ``<cache root>/ms_llm/kernels/<hash>/<name>.so`` where the hash covers the source text,
the compiler's version line and the flags, so editing the source, upgrading g++ or moving to a CPU without AVX2
yields a new build instead of a stale or illegal one. The cache root is ``$XDG_CACHE_HOME`` or ``~/.cache``.
A build writes to a temporary file in the target directory and renames it into place (``os.replace`` is atomic
on POSIX), so processes building concurrently never load a half-written library; the last rename wins and
all candidates are identical.

ISA tiers, picked from ``/proc/cpuinfo`` when the library is built (``isa="auto"``) and part of the hash, so a
cache directory shared between machines never hands a library to a CPU without its instructions:
``avx512`` (``-mavx512f -mavx512vl -mavx2 -mfma``, 512-bit vectors and a 4 x 32 GEMM micro-kernel; needs
avx512f, avx512vl, avx2 and fma),
``avx2`` (``-mavx2 -mfma``; needs avx2 and fma), else ``generic``: the compiler's default target (SSE2 on
x86-64, NEON on aarch64, e.g. the Kunpeng hosts of Ascend servers). No ``-march=native``. The source is the
same plain C++ for every tier; only gcc's auto-vectoriser changes its vector width.

Sources that call a library name it in ``EXTERNAL``: ``blas_linear.cc`` compiles against the headers of the
``scipy-openblas32`` wheel (OpenBLAS, a pinned dependency) and links its ``libscipy_openblas.so`` with an rpath to
the wheel's folder; that folder and the wheel's version are part of the hash.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC_DIR = Path(__file__).resolve().parent / "csrc"

# -O3 (gnu++17 keeps -ffp-contract=fast, so a*b+c becomes an FMA); -fno-trapping-math -fno-math-errno let gcc
# if-convert and vectorise the masked exp/select loops without -ffast-math (which would also assume no
# infinities, and the kernels use -inf for masked scores); -fno-predictive-commoning stops gcc from unrolling
# the GEMM micro-kernel's k loop and spilling its register accumulators.
BASE_FLAGS = ("-O3", "-std=gnu++17", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden",
              "-fno-trapping-math", "-fno-math-errno", "-fno-predictive-commoning")
ISA_FLAGS = {
    # FA_NR=32: the GEMM micro-kernel keeps 4 x 32 floats = 8 zmm accumulators (4 x 16 would be latency bound)
    "avx512": ("-mavx512f", "-mavx512vl", "-mavx2", "-mfma", "-mprefer-vector-width=512", "-DFA_NR=32"),
    "avx2": ("-mavx2", "-mfma"),
    "generic": (),
}
_ISA_CPU_FLAGS = {"avx512": {"avx512f", "avx512vl", "avx2", "fma"}, "avx2": {"avx2", "fma"}}


class KernelBuildError(RuntimeError):
    """The C++ compiler is missing or failed; the message carries the command and the compiler output."""


def _openblas_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compile flags, link flags) for OpenBLAS from the ``scipy-openblas32`` wheel."""
    try:
        import scipy_openblas32
    except ImportError as exc:
        raise KernelBuildError("the BLAS-backed CPU kernels need the 'scipy-openblas32' package (a dependency of "
                               "ms_llm: pip install -e .)") from exc
    lib_dir = scipy_openblas32.get_lib_dir()
    return ((f"-I{scipy_openblas32.get_include_dir()}", f"-DMS_LLM_OPENBLAS_VERSION={scipy_openblas32.__version__}"),
            (f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", f"-l{scipy_openblas32.get_library()}"))


# source -> function returning the (compile, link) flags of the library it calls
EXTERNAL = {"blas_linear.cc": _openblas_flags}


def _flags(source: str, isa: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compile flags, link flags) for ``csrc/<source>``; the link flags go after the source on the command."""
    cflags, ldflags = EXTERNAL[source]() if source in EXTERNAL else ((), ())
    return BASE_FLAGS + ISA_FLAGS[resolve_isa(isa)] + cflags, ldflags


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (Linux ``/proc/cpuinfo``); empty when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_isa(isa: str = "auto") -> str:
    """``auto`` -> the widest tier this CPU supports; an explicit tier is returned as is (it must exist)."""
    if isa != "auto" and isa not in ISA_FLAGS:
        raise ValueError(f"isa must be one of 'auto', {', '.join(repr(k) for k in ISA_FLAGS)}; got {isa!r}")
    if isa != "auto":
        return isa
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    flags = cpu_flags()
    for tier in ("avx512", "avx2"):
        if _ISA_CPU_FLAGS[tier] <= flags:
            return tier
    return "generic"


def default_cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ms_llm" / "kernels"


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"cannot run the C++ compiler {cxx!r}: {exc}") from exc
    if res.returncode != 0:
        raise KernelBuildError(f"{cxx} --version failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    return res.stdout.splitlines()[0] if res.stdout else ""


def library_path(source: str, isa: str = "auto", cache_root: str | os.PathLike | None = None,
                 cxx: str = "g++") -> Path:
    """Where the library for ``csrc/<source>`` with these settings lives (built or not). The cache key covers the
    source, the shared headers ``csrc/*.h`` it may include, the compiler version and the flags."""
    src = CSRC_DIR / source
    cflags, ldflags = _flags(source, isa)
    digest = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(CSRC_DIR.glob("*.h"))]
    for part in (src.read_bytes(), *headers, _compiler_version(cxx).encode(), " ".join(cflags + ldflags).encode()):
        digest.update(part)
        digest.update(b"\0")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / digest.hexdigest()[:20] / (src.stem + ".so")


def build_library(source: str, isa: str = "auto", cache_root: str | os.PathLike | None = None,
                  cxx: str = "g++") -> str:
    """Compile ``csrc/<source>`` (unless cached) and return the absolute path of the ``.so``."""
    src = CSRC_DIR / source
    if not src.is_file():
        raise KernelBuildError(f"kernel source not found: {src} (is the package data installed?)")
    if shutil.which(cxx) is None:
        raise KernelBuildError(f"C++ compiler {cxx!r} not found on PATH; install g++ to use the fused CPU kernels")
    out = library_path(source, isa=isa, cache_root=cache_root, cxx=cxx)
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".so", dir=out.parent)
    os.close(fd)
    cflags, ldflags = _flags(source, isa)
    cmd = [cxx, *cflags, "-o", tmp, str(src), *ldflags]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(tmp)
        raise KernelBuildError(f"compiling {src} failed: {exc}\ncommand: {' '.join(cmd)}") from exc
    if res.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"compiling {src} failed (exit {res.returncode})\ncommand: {' '.join(cmd)}\n"
                               f"{res.stdout}{res.stderr}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return str(out)


def main(argv=None) -> int:
    """``python -m ms_llm.kernels._build [source] [--isa TIER] [--cache-root DIR]``: build and print the path."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="flash_attention.cc", help="file under ms_llm/kernels/csrc/")
    parser.add_argument("--isa", default="auto", choices=("auto", *ISA_FLAGS))
    parser.add_argument("--cache-root", default=None, help="default: $XDG_CACHE_HOME/ms_llm/kernels")
    parser.add_argument("--cxx", default="g++")
    args = parser.parse_args(argv)
    print(build_library(args.source, isa=args.isa, cache_root=args.cache_root, cxx=args.cxx))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
