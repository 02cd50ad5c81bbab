"""Named fault points for crash-consistency tests.

`fault_point(name)` does nothing unless the environment variable GPTLINE_FAULT_DIR names a directory holding a
file called `name`: then it removes that file (so the fault fires once) and kills the process with os._exit, the
way a SIGKILL or an OOM kill would, skipping every `finally` and atexit handler. `fault_armed(name)` only reports
that the fault is armed (once, or n times when the file holds n), for injected corruption such as a NaN loss. Tests arm a fault by creating the
file; Ray workers inherit the variable from the process that started Ray.
"""

import os

EXIT_CODE = 17


def fault_armed(name: str) -> bool:
    """True once (the marker is consumed) when a test armed the fault `name`; for faults that are not a crash,
    such as a corrupted value."""
    fault_dir = os.environ.get("GPTLINE_FAULT_DIR")
    if not fault_dir:
        return False
    marker = os.path.join(fault_dir, name)
    try:
        with open(marker) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return False
    remaining = int(text) if text.isdigit() else 1  # a marker holding n fires n times
    if remaining > 1:
        with open(marker, "w") as f:
            f.write(str(remaining - 1))
    else:
        try:
            os.remove(marker)
        except FileNotFoundError:  # another process consumed it first
            return False
    return True


def fault_point(name: str) -> None:
    if fault_armed(name):
        os._exit(EXIT_CODE)
