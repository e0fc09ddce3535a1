"""Image-set metrics (CMMD, FID, CLIP score) over pluggable embedders, and benchmarks.

Importing this package registers the core's own benchmarks (:mod:`slimdit.metrics.external`: cmmd, fid, hpsv2,
imagereward, geneval, dpg-bench) into :data:`slimdit.registry.BENCHMARKS`; their optional packages load only when
one of them runs; and its rewards (:mod:`slimdit.metrics.rewards`: clip, imagereward, hpsv2) into
:data:`slimdit.registry.REWARDS`.
"""

from slimdit.metrics.external import register as _register_external
from slimdit.metrics.rewards import register as _register_rewards

_register_external()
_register_rewards()
