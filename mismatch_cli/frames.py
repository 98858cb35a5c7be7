"""pandas on demand. The tables a command prints or writes are DataFrames, but a streamed
pass needs none until its end, and importing pandas costs about 0.2 s of a 2-core
machine's start-up (a tenth of `report` at 10^7 rows). Modules on the streamed path import
it inside the functions that build tables; `import_beside` starts that import in a
thread as a pass over a file begins, where it runs while Arrow's decode and the compiled
loops leave the interpreter free; the first `import pandas` after it waits for it.
`is_frame` asks whether an object is a DataFrame without importing pandas (if pandas was
never imported, nothing is one)."""

from __future__ import annotations

import sys
import threading
from typing import Any

_started = threading.Event()


def is_frame(obj: Any) -> bool:
    """Is obj a pandas DataFrame? Never imports pandas."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(obj, pd.DataFrame)


def import_beside() -> None:
    """Import pandas in a background thread, once per process, unless it is imported
    already. A failure there is left for the caller's own `import pandas` to raise."""
    if "pandas" in sys.modules or _started.is_set():
        return
    _started.set()
    threading.Thread(target=_import, name="mismatch-import-pandas", daemon=True).start()


def _import() -> None:
    try:
        import pandas  # noqa: F401
    except Exception:
        pass


__all__ = ["import_beside", "is_frame"]
