"""The wire format that ``ptmserve.server`` and ``ptmserve.client`` share; neither imports the other.

- ``tensors``: KServe v2 tensor and inference body records, the BYTES element layout;
- ``codecs``: those bodies to and from bytes (JSON and the binary tensor data extension);
- ``errors``: the one error table, ``ptmserve.errors`` classes <-> HTTP status and error bodies;
- ``schedule``: the bounds of the ``priority`` and ``timeout`` parameters.

No HTTP framework and no torch here: numpy and the standard library only.
"""
