"""Named fault points for crash-consistency tests.

`fault_point(name)` does nothing unless the environment variable GPTLINE_FAULT_DIR names a directory holding a
file called `name`: then it removes that file (so the fault fires once) and kills the process with os._exit, the
way a SIGKILL or an OOM kill would, skipping every `finally` and atexit handler. Tests arm a fault by creating the
file; Ray workers inherit the variable from the process that started Ray.
"""

import os

EXIT_CODE = 17


def fault_point(name: str) -> None:
    fault_dir = os.environ.get("GPTLINE_FAULT_DIR")
    if not fault_dir:
        return
    marker = os.path.join(fault_dir, name)
    try:
        os.remove(marker)
    except FileNotFoundError:
        return
    os._exit(EXIT_CODE)
