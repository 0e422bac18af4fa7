"""amm-kernels: Adaptive Memory Momentum optimizers (AMSGD, AMAdamW) with fused kernels.

    from amm_kernels import AMAdamW
    opt = AMAdamW(model.parameters(), lr=3e-4)
"""
from .amadamw import AMAdamW
from .amsgd import AMSGD
from .rllc import RLLC
from .backends import available_backends, backend_supports_dtype

__all__ = ["AMSGD", "AMAdamW", "RLLC", "available_backends", "backend_supports_dtype"]
__version__ = "0.1.0"
