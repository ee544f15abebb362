"""Mutation audit: puts each small bug of issue 9's audit into a scratch copy of
the checkout and counts the tests that fail (each must be killed by >= 2).

    python benchmarks/mutation_audit.py [--only NAME] [--keep DIR]

The copy gets its own native build (CMake + Ninja, CPU only) and runs in a
throwaway virtual environment that sees this environment's packages but not
its editable jaxjpeg, so every test, subprocesses included, imports the
mutated copy. Prints one line per mutant: its name, the failing tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, original text, mutated text, test files to run)
MUTANTS = {
    "policy precedence swapped": (
        "jaxjpeg/checkpoint.py",
        "        if any(fnmatch.fnmatchcase(path, p) for p in self.lossless):\n"
        "            return False\n"
        "        if any(fnmatch.fnmatchcase(path, p) for p in self.compress):\n"
        "            return True\n",
        "        if any(fnmatch.fnmatchcase(path, p) for p in self.compress):\n"
        "            return True\n"
        "        if any(fnmatch.fnmatchcase(path, p) for p in self.lossless):\n"
        "            return False\n",
        ["tests/test_checkpoint.py"]),
    "first lossless pattern ignored": (
        "jaxjpeg/checkpoint.py",
        "for p in self.lossless):", "for p in self.lossless[1:]):",
        ["tests/test_checkpoint.py"]),
    "CRC skipped when read_blob reads into out=": (
        "jaxjpeg/format.py",
        "if verify and crc32c(view) != info.crc32c:",
        "if verify and out is None and crc32c(view) != info.crc32c:",
        ["tests/test_format.py", "tests/test_checkpoint_corruption.py"]),
    "interval bound k >= count -> k > count": (
        "xla_ops/decode_plan.h",
        "if (k < 0 || k >= (blocks + per - 1) / per) return false;",
        "if (k < 0 || k > (blocks + per - 1) / per) return false;",
        ["tests/test_ops.py", "tests/test_robustness.py"]),
    "affine offset sign flipped": (
        "xla_ops/output_stage.h",
        "return static_cast<float>(sample) * scale + offset;",
        "return static_cast<float>(sample) * scale - offset;",
        ["tests/test_ops.py", "tests/test_checkpoint.py", "tests/test_codec.py"]),
    "IDCT tie rounding off by one": (
        "xla_ops/idct_islow.h",
        "return (x + (Acc(1) << (n - 1))) >> n;",
        "return (x + (Acc(1) << (n - 1)) - 1) >> n;",
        ["tests/test_ops.py", "tests/test_checkpoint.py", "tests/test_codec.py",
         "tests/test_interop.py"]),
    "restart-marker order check removed": (
        "xla_ops/stream_header.cc",
        "if (found >= intervals || next != marker::kRST0 + ((found - 1) & 7)) {",
        "if (found >= intervals) {",
        ["tests/test_codec.py", "tests/test_robustness.py"]),
    "RDO lambda doubled": (
        "xla_ops/encoder.cc",
        "constexpr float kRdoLambda = 0.12f;", "constexpr float kRdoLambda = 0.24f;",
        ["tests/test_codec.py", "tests/test_rate.py"]),
    "float16 subnormals truncated": (
        "xla_ops/output_stage.h",
        "return static_cast<uint16_t>(sign | ShiftRoundEven(mantissa, shift));",
        "return static_cast<uint16_t>(sign | (mantissa >> shift));",
        ["tests/test_ops.py", "tests/test_codec.py"]),
}


def _run(cmd, **kwargs):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)


def _venv(work: str) -> str:
    """A virtual environment whose only packages are this one's, by a path
    entry (so this environment's editable-install hook is not loaded)."""
    venv = os.path.join(work, "venv")
    _run([sys.executable, "-m", "venv", venv])
    site = os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                        "site-packages")
    with open(os.path.join(site, "outer.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return os.path.join(venv, "bin", "python")


def _build(copy: str) -> None:
    import pybind11
    build = os.path.join(copy, "build-mutant")
    if not os.path.exists(os.path.join(build, "build.ninja")):
        _run(["cmake", "-S", os.path.join(copy, "xla_ops"), "-B", build, "-G", "Ninja",
              "-DJAXJPEG_CUDA=OFF", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
              f"-DPython_EXECUTABLE={sys.executable}"])
    _run(["cmake", "--build", build, "--target", "_native"])
    (so,) = [f for f in os.listdir(build) if f.startswith("_native.") and f.endswith(".so")]
    shutil.copy(os.path.join(build, so), os.path.join(copy, "jaxjpeg", so))


def _failures(python: str, copy: str, tests: list[str]) -> list[str]:
    env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    return sorted(set(re.findall(r"^FAILED (\S+)", proc.stdout, re.M)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the mutants whose name contains this")
    parser.add_argument("--keep", help="work in this directory and keep it")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="jj_mutants_")
    copy = os.path.join(work, "copy")
    if not os.path.exists(copy):
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
            "build", ".git", "__pycache__", "*.so", "build-mutant"))
    python = _venv(work) if not os.path.exists(os.path.join(work, "venv")) else \
        os.path.join(work, "venv", "bin", "python")
    _build(copy)
    baseline = {}
    try:
        for name, (path, old, new, tests) in MUTANTS.items():
            if args.only and args.only not in name:
                continue
            target = os.path.join(copy, path)
            with open(target) as f:
                original = f.read()
            if original.count(old) != 1:
                print(f"{name}: the original text is not in {path} exactly once")
                continue
            key = tuple(tests)
            if key not in baseline:  # tests failing without any mutant do not count
                baseline[key] = set(_failures(python, copy, tests))
            with open(target, "w") as f:
                f.write(original.replace(old, new))
            try:
                if path.startswith("xla_ops/"):
                    _build(copy)
                killed = [t for t in _failures(python, copy, tests) if t not in baseline[key]]
            finally:
                with open(target, "w") as f:
                    f.write(original)
                if path.startswith("xla_ops/"):
                    _build(copy)
            print(f"{name}: killed by {len(killed)} test(s)", flush=True)
            for t in killed:
                print(f"    {t}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
