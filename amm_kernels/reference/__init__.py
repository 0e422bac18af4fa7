"""The pure-PyTorch reference backend: SPEC.md written for reading, the yardstick for every kernel."""
from .amadamw_reference import amadamw_step
from .amsgd_reference import amsgd_step
from .rllc_reference import rllc_step

__all__ = ["amsgd_step", "amadamw_step", "rllc_step"]
