"""Weight tiers (host and device, byte-budgeted), skeletons and pipelined loading; see docs/memory.md.

Import from the modules (``ptmserve.memory.manager``, ``ptmserve.memory.sizes``): this package file
imports nothing, so ``parse_size`` stays usable without torch.
"""
