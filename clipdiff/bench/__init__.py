"""``make bench``: speed claims measured as ratios, side by side in one process (``python -m clipdiff.bench``).

Absolute times on a shared 2-core machine mean little; ratios of two ways of doing the same work, measured
alternately in the same process, mean more. One module per claim: :mod:`.data` (PNG folders vs the packed cache),
:mod:`.overhead` (Lightning vs a bare loop), :mod:`.sampling` (original recipe vs default; guided vs unguided),
:mod:`.growth` (indexing/caching cost and memory vs dataset size), :mod:`.gpu` (GPU rates); :mod:`.report` writes
the table (CSV, README block) and :mod:`.cli` runs them.
"""

from clipdiff.bench.cli import main
from clipdiff.bench.common import COLUMNS, Claim

__all__ = ["COLUMNS", "Claim", "main"]
