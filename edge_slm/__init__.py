"""edge-slm: run a small language model on a single-board computer, on the device."""

import os

# numpy's BLAS must not start worker threads of its own: on a 2-core board one
# spinning after a numpy call takes a core from the kernels' thread pool. Set
# before numpy loads (our modules import it after this); a caller's own
# setting is kept.
# (numpy's wheels bring OpenBLAS; OpenMP's own setting is left alone, so the
# peer in `edge-slm bench` keeps the threads it is given.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
