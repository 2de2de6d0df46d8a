"""The lab's harness: training engine, sweeps, analysis and tools over the model packages.

Importing it registers every mixer family with archs.mixers (ssm adds the recurrent G and M), so
any model the harness builds can use any layer-pattern letter.
"""

import ssm  # noqa: F401
