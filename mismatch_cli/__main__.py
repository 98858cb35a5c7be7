"""`python -m mismatch_cli`: the same entry point as the `mismatch` script."""

import sys

from mismatch_cli.cli import main

if __name__ == "__main__":
    # multiprocessing's spawned children (vLLM's engine core and worker) re-import the main
    # module, but skip one named `pkg.__main__`; by path (no __spec__) they run this file,
    # so they import the CLI and its quiet_third_party() before vLLM, as the children of the
    # `mismatch` script do.
    sys.modules["__main__"].__spec__ = None
    main()
