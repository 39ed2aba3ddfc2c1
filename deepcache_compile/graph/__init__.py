"""Graph passes: U-Net -> trace -> branches -> partition (and MACs per node).

Everything here works on `torch.export`/`torch.fx` graphs only; nothing compiles or runs a generation.
"""

from . import branches, blocks  # noqa: F401,E402  (each registers its cut finder, in this order: graph/cuts.py)
