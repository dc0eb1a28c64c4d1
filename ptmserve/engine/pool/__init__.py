"""Several engine worker processes behind one front end (``ptmserve serve --workers N``).

``WorkerPool`` (``pool.py``) has the API of ``Engine``; see docs/architecture.md, "Processes".
"""

from ptmserve.engine.pool.pool import WorkerPool

__all__ = ["WorkerPool"]
