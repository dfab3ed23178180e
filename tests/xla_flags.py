"""The XLA flags the suite runs under, also for the processes its tests start.

Simulated CPU devices, so that every multi-device path runs, and no LLVM
optimisation of the machine code of XLA's own loops. The suite's programs are
small and each runs for milliseconds, so most of its time went to LLVM
optimising code that barely ran: on a 2-core AMD EPYC (2026-11-30) the whole
suite took 14:39 at level 0 and 15:08 at level 1, against 20:12 at the default,
level 2, every test passing each time. The level is a code-generation setting:
XLA's HLO passes (fusion, layouts, the library kernels its products and
convolutions call) are the same at every level (a ResNet-18 training step's
optimised HLO is identical at 0 and 2), but its loops round differently (98% of
that step's gradient values differ, by at most 1.5e-6 of the largest). Every
comparison in the suite is between programs compiled alike, or against a peer
(Keras, PyTorch) within a tolerance. A level the caller sets wins.
"""

import re

DEVICE_COUNT = "--xla_force_host_platform_device_count"
OPTIMIZATION_LEVEL = "--xla_backend_optimization_level"
SUITE_OPTIMIZATION_LEVEL = 0


def with_devices(flags: str, devices: int) -> str:
    """``flags`` with ``devices`` simulated CPU devices (any count in them replaced)
    and, unless they name one, the suite's optimisation level."""
    flags = re.sub(rf"{DEVICE_COUNT}=\d+", "", flags).split()
    if not any(flag.startswith(OPTIMIZATION_LEVEL + "=") for flag in flags):
        flags.append(f"{OPTIMIZATION_LEVEL}={SUITE_OPTIMIZATION_LEVEL}")
    return " ".join([*flags, f"{DEVICE_COUNT}={devices}"])
