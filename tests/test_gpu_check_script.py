"""benchmarks/gpu_check.sh, the one prepared device check of the GPU
decoder, must fit the 5 minutes a lent GPU gives it: its steps' limits (and
the grace before each kill) add up to at most 300 s. It cannot run here (no
GPU); its shell syntax, its limits and the arguments it passes to the
throughput script are checked instead."""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.sh"


def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_gpu_check_fits_five_minutes_with_every_step():
    out = subprocess.run(["bash", str(SCRIPT), "--limits"], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    steps = dict(re.findall(r"^(.+): (\d+)s \+ \d+s$", out, re.M))
    assert set(steps) == {"offline wheels", "build", "gpu tests", "throughput", "memcheck",
                          "nsight compute", "vs orbax", "vs orbax, flax cnn"}, out
    total = int(re.search(r"^total: (\d+)s$", out, re.M).group(1))
    assert total <= 300, out


def test_orbax_comparison_takes_the_check_arguments():
    text = SCRIPT.read_text().replace("\\\n", " ")
    used = re.findall(r"checkpoint_vs_orbax\.py([^\n]*)", text)
    assert len(used) == 2
    help_text = subprocess.run([sys.executable, str(BENCHMARKS / "checkpoint_vs_orbax.py"),
                                "--help"], check=True, capture_output=True, text=True,
                               timeout=120).stdout
    for args in used:
        for option in re.findall(r"--[\w-]+", args):
            assert option in help_text, option


def test_throughput_script_takes_the_check_arguments():
    """The options gpu_check.sh passes exist (argparse refuses unknown ones)."""
    text = SCRIPT.read_text()
    used = set(re.findall(r"gpu_decode\.py((?: --[\w-]+(?: [\d,]+)?)*)", text))
    assert used
    help_text = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_decode.py"), "--help"],
                               check=True, capture_output=True, text=True, timeout=120).stdout
    for args in used:
        for option in re.findall(r"--[\w-]+", args):
            assert option in help_text, option
