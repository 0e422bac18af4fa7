"""The pure-PyTorch reference backend: SPEC.md written for reading, the yardstick for every kernel."""
from .amadamw_reference import amadamw_step
from .amsgd_reference import amsgd_step
from .rllc_reference import rllc_step

__all__ = ["amsgd_step", "amadamw_step", "rllc_step", "unavailable_reason"]


def unavailable_reason(device) -> str | None:
    """Why the reference cannot run on `device` (None where it can): it combines the sums behind beta
    (and RLLC's law) in float64, which Apple's MPS does not have. Not tried on a Mac: MPS refuses
    float64 tensors outright, so the first step would fail there."""
    if device.type == "mps":
        return "Apple's MPS has no float64, in which the reference combines the sums behind beta"
    return None
