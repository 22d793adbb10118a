"""Runs examples/predict_dataset.py (arguments after the first) and SIGKILLs process 0 right after it has committed
the number of shards given as the first argument: a crash at a known point, for the restart tests.

    python tests/predict_dataset_killer.py 2 --model ... --dataset ... --output_dir ...
"""

import os
import runpy
import signal
import sys
from pathlib import Path

from modeling_moa_depthclip.inference.dataset_prediction import PredictionOutput

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "predict_dataset.py"
kill_after = int(sys.argv.pop(1))
commit = PredictionOutput.commit
committed = 0


def commit_then_die(self, *args, **kwargs):
    global committed
    commit(self, *args, **kwargs)
    committed += 1
    if committed >= kill_after and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


PredictionOutput.commit = commit_then_die
sys.argv[0] = str(SCRIPT)
runpy.run_path(str(SCRIPT), run_name="__main__")
