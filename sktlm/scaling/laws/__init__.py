"""The registry of scaling laws: every analysis, backtest, --predict row, report table and plot iterates over
LAWS, in this order. A law is one module of this package defining LAWS (instances of
sktlm.scaling.laws.base.Law); adding one is that module, its test, and one line below.
"""

import importlib

MODULES = (
    'power',        # L(N), L(C): Kaplan et al. 2020
    'chinchilla',   # L(N,D): Hoffmann et al. 2022
    'muennighoff',  # L(N,D,U): Muennighoff et al. 2023, repeated data
)

LAWS = tuple(law for m in MODULES for law in importlib.import_module(f'{__name__}.{m}').LAWS)
BY_KIND = {law.kind: law for law in LAWS}
ROW_COLUMNS = {c: r for law in LAWS for c, r in law.row_columns.items()}  # point column -> results column


def allocating():
  """The laws that give a compute-optimal allocation."""
  return [law for law in LAWS if law.allocates]
