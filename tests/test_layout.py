"""The product never loads the research tooling: importing the model, the training, the CLI and the app leaves
`textdiff.research` (benchmarks, baselines) unimported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "textdiff"


def test_the_model_training_cli_and_app_do_not_import_the_research_package():
    code = (
        f"import sys; sys.path.insert(0, {str(APP_DIR)!r})\n"
        "import textdiff.model.segmenter, textdiff.training.train, textdiff.training.pretrain\n"
        "import textdiff.training.inference, textdiff.training.predict, textdiff.weak.cdm, textdiff.weak.cdm_masks\n"
        "import textdiff.synthesis.emit, textdiff.synthesis.synthetic, textdiff.activelearning, textdiff.cli\n"
        "import main\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('textdiff.research'))\n"
        "print(loaded); sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
