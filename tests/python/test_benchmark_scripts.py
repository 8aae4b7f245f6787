"""The benchmark scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ first on
sys.path: a script named like an importable package shadows it for every library the script
imports (transformers imports the PyPI package `kernels` when it finds one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_script_shadows_an_importable_module():
    stems = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert stems, "no benchmark scripts found"
    import json

    probe = ("import importlib.util, sys, json; names = json.loads(sys.argv[1]); "
             "print(json.dumps([n for n in names if n in sys.stdlib_module_names "
             "or importlib.util.find_spec(n) is not None]))")
    out = subprocess.run([sys.executable, "-P", "-c", probe, json.dumps(stems)],
                         capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(out.stdout) == []
    # Names that libraries the benchmarks import look for (transformers: `kernels`).
    assert not {"kernels", "torch", "transformers", "numpy", "openai"} & set(stems)


def test_offline_throughput_imports_transformers_from_its_own_directory():
    """What the script does first, run the way users run it (no -P)."""
    code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); "
            "import transformers.integrations.hub_kernels")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=BENCHMARKS, timeout=120)
    subprocess.run([sys.executable, str(BENCHMARKS / "offline_throughput.py"), "--help"],
                   check=True, cwd=BENCHMARKS, capture_output=True, timeout=120)
