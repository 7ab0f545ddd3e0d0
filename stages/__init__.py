"""The pipeline's stages, one module per DVC stage; run each as `python -m stages.<verb>`."""

import sys

# Run as a stage (`python -m stages.<verb>`): a stop while its libraries load ends it with one line.
if any(arg == "-m" and nxt.startswith("stages.") for arg, nxt in zip(sys.orig_argv, sys.orig_argv[1:], strict=False)):
    from stages.common.errors import exit_quietly_when_interrupted, import_tensorflow_quietly

    exit_quietly_when_interrupted("interrupted; outputs of this stage were not written")
    import_tensorflow_quietly()
