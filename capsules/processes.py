"""Facts about the processes of this machine, for the writers that must not step on a live one."""

import os


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
