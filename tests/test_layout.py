"""The product never loads the research tooling: importing the model, the training, the CLI and the app leaves
`textdiff_bench` (benchmarks, baselines) unimported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "textdiff"


def test_the_model_training_cli_and_app_do_not_import_the_research_package():
    code = (
        f"import sys; sys.path.insert(0, {str(APP_DIR)!r})\n"
        "import textdiff.model.segmenter, textdiff.training.train, textdiff.training.pretrain\n"
        "import textdiff.inference, textdiff.evaluation, textdiff.writers, textdiff.weak.cdm, textdiff.weak.cdm_masks\n"
        "import textdiff.synthesis.emit, textdiff.synthesis.synthetic, textdiff.activelearning, textdiff.cli\n"
        "import main\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('textdiff_bench'))\n"
        "print(loaded); sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_no_product_file_names_the_benchmarks():
    """The benchmarks are a package apart (benchmarks/textdiff_bench): the installed library holds no research code,
    and no file of the library or the app imports it, even lazily inside a function."""
    root = APP_DIR.parents[1]
    assert not (root / "lib" / "textdiff" / "research").exists()
    files = [*(root / "lib" / "textdiff").rglob("*.py"), *APP_DIR.rglob("*.py")]
    naming = [str(path) for path in files if "textdiff_bench" in path.read_text() or "textdiff.research" in path.read_text()]
    assert not naming


def test_the_package_declares_every_library_it_imports():
    """`pip install .` alone must give the library what it imports: each third-party module under lib/textdiff comes
    from a distribution pyproject.toml lists (test-only and app-only ones stay out of the runtime list)."""
    import ast
    import importlib.metadata
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    declared = {normal(re.split(r"[<>=!;\[ ]", dep)[0]) for dep in project["dependencies"]}
    modules = set()
    for path in (root / "lib" / "textdiff").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    providers = importlib.metadata.packages_distributions()
    third_party = {module: providers[module] for module in modules if module in providers and module != "textdiff"}
    missing = {module: dists for module, dists in third_party.items()
               if not ({normal(d) for d in dists} | {normal(module)}) & declared}
    assert not missing, f"imported by lib/textdiff but not in pyproject.toml's dependencies: {missing}"
    assert not {"pytest", "playwright", "guided-diffusion-sdk", "monailabel"} & declared
