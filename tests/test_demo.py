"""``alignd demo`` prints only its own lines: no library progress bars, warnings or tracebacks.

The whole demo runs (real ``alignd serve`` child, real DPO job, generations before and after) on
tiny-random-llama, with its output in a pipe: the plain rendering of ``service/console.py``. The
library noise it must hide is shown to exist by the same probe run without the entry point's set-up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import MODEL_CACHE, make_settings

REPO = Path(__file__).resolve().parent.parent
ALIGND = str(Path(sys.executable).parent / "alignd")
#: What the training stack prints on its own: tqdm bars, warnings, its loggers' stderr handler.
NOISE = ("Loading weights", "it/s]", "%|", "FutureWarning", "UserWarning", "DeprecationWarning", "Traceback",
         "[transformers]", "a transformers warning", "a peft warning")


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without what alignd's entry points set, so they must set it."""
    dropped = ("PYTHONWARNINGS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
               "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_") and k not in dropped}
    return {**env, "PYTHONPATH": str(REPO), **extra}


PROBE = """
import logging, sys, warnings
from pathlib import Path
if sys.argv[1] == "quiet":
    from service.console import quiet_libraries
    quiet_libraries(Path(sys.argv[2]))
from workers.modeling import load_causal_lm  # imports transformers, which adds its stderr handler
if sys.argv[1] == "quiet":
    from service.console import drop_library_stderr_handlers
    drop_library_stderr_handlers()
logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
logging.getLogger("peft.tuners").warning("a peft warning")
warnings.warn("deprecated soon", FutureWarning)
warnings.warn("a user warning", UserWarning)
load_causal_lm(sys.argv[3])  # transformers' "Loading weights" tqdm bar
print("loaded")
"""


def test_quiet_libraries_sends_library_output_to_the_log_file(tmp_path: Path) -> None:
    from workers.base_models import resolve_base_model

    model = resolve_base_model("tiny-random-llama", make_settings(tmp_path))  # the cached tiny model
    log = tmp_path / "demo.log"

    def probe(mode: str) -> str:
        result = subprocess.run([sys.executable, "-c", PROBE, mode, str(log), str(model)], env=_clean_env(),
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    loud = probe("loud")  # the libraries left alone: every kind of noise is there
    for noise in ("Loading weights", "it/s]", "FutureWarning", "UserWarning", "a transformers warning",
                  "a peft warning"):
        assert noise in loud, (noise, loud)
    assert not log.exists()
    quiet = probe("quiet")
    assert quiet.strip() == "loaded", quiet
    logged = log.read_text()
    assert "WARNING transformers.modeling_utils: a transformers warning" in logged
    assert "WARNING peft.tuners: a peft warning" in logged
    assert "UserWarning: a user warning" in logged  # other warnings land in the log
    assert "deprecated soon" not in logged  # FutureWarnings are filtered out


def test_the_demo_output_is_clean_plain_lines(tmp_path: Path) -> None:
    data = tmp_path / "data"
    started = time.time()
    result = subprocess.run([ALIGND, "demo", "--model", "tiny-random-llama", "--epochs", "1"],
                            env=_clean_env(ALIGND_DATA_DIR=str(data), ALIGND_MODEL_CACHE=str(MODEL_CACHE)),
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    print(f"demo took {time.time() - started:.1f}s\n{result.stdout}{result.stderr}")
    log = data / "demo.log"
    assert result.returncode == 0, result.stdout + result.stderr + log.read_text()[-5000:]
    assert result.stderr == ""
    out = result.stdout
    for noise in NOISE:
        assert noise not in out, noise
    assert "\x1b" not in out and "\r" not in out  # a pipe gets plain lines: no ANSI codes, no redraws
    lines = out.splitlines()
    assert lines[0] == f"alignd demo — data dir {data}"
    assert any(line.startswith("[########################]  ") and line.endswith("  succeeded") for line in lines)
    assert "· The job has successfully completed" in out
    table = {line.split()[0]: line for line in lines if line.startswith(("loss ", "margin ", "accuracy ", "model "))}
    assert set(table) == {"loss", "margin", "accuracy", "model"}, out
    assert "ft:tiny-random-llama:demo:concise:ftjob-" in table["model"]
    assert "held-out prompts, before → after DPO:" in out and "  Q: What is the capital of Portugal?" in out
    # the retention probe: every fact with its answers before and after, marked, then the job's figure
    assert "retention probe, before → after DPO (is the fact still there?):" in out
    from workers.demo_data import RETENTION_FACTS

    marked = [line for line in lines if line.startswith("  Q: ") and "(fact: " in line]
    assert len(marked) == len(RETENTION_FACTS), out
    assert all(line.endswith((" — kept", " — lost", " — gained", " — absent")) for line in marked), marked
    assert sum(line.startswith(("  before [yes]: ", "  before [no]: ")) for line in lines) == len(RETENTION_FACTS)
    assert sum(line.startswith(("  after  [yes]: ", "  after  [no]: ")) for line in lines) == len(RETENTION_FACTS)
    figure = [line for line in lines if line.startswith("retention: ")]
    assert len(figure) == 1 and "eval/retention" in figure[0], out
    assert re.match(r"retention: (\d\.\d\d|n/a \(the base knew none\)) of the facts the base answered right",
                    figure[0]), figure
    assert "retention-probe facts" in out
    assert lines[-1].startswith("demo finished in ")
    assert "Uvicorn" in log.read_text() or "alignd: API on" in log.read_text()  # the service wrote to the log
