"""Graph passes: U-Net -> trace -> branches -> partition (and MACs per node).

Everything here works on `torch.export`/`torch.fx` graphs only; nothing compiles or runs a generation.
"""
