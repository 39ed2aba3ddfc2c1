"""deepcache_compile: DeepCache as a compiler pass for diffusion U-Nets.

    from deepcache_compile import compile_deepcache, list_branches
    pipe.unet = compile_deepcache(pipe.unet, branch=1, interval=5)
"""

__version__ = "0.1.0"

from .api import BranchInfo, compile_deepcache, list_branches
from .config import DeepCacheConfig
from .dispatch import DeepCacheUNet
from .engine import DeepCacheEngine, ManifestError, load_deepcache
from .schedule import Schedule, Step

__all__ = [
    "compile_deepcache",
    "list_branches",
    "BranchInfo",
    "DeepCacheConfig",
    "DeepCacheUNet",
    "DeepCacheEngine",
    "ManifestError",
    "load_deepcache",
    "Schedule",
    "Step",
]
