"""The sweep wing: expand sweep files into runs, launch them as `sktlm train` processes (locally or on
Ray), track their status and collect results.csv. Talks to training only through the command line and
the files a run writes (docs/run_files.md).

Sweep files import the DSL from here: `from sktlm.sweep import Run, moe_planners, planners, product, sweep, zip`.
"""

from sktlm.sweep import moe_planners, planners
from sktlm.sweep.spec import Run, product, run_name, sweep, zip

__all__ = ['Run', 'moe_planners', 'planners', 'product', 'run_name', 'sweep', 'zip']
