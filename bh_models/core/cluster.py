"""Site settings of the SLURM profile: partition and account, never committed.

The profile (``workflow/profiles/slurm/config.yaml``) evaluates
:func:`setting` for ``slurm_partition`` and ``slurm_account``. A value comes
from the environment (``BH_SLURM_PARTITION``, ``BH_SLURM_ACCOUNT``) or, when
unset there, from a small user file, ``~/.config/bh/slurm.yaml``::

    partition: gpu
    account: myproject

Empty means the cluster's default partition and the plugin's account guess.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

USER_FILE = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "bh" / "slurm.yaml"


def setting(name: str, *, user_file: Path | None = None) -> str:
    """``partition`` or ``account`` for the SLURM profile ('' when unset)."""
    value = os.environ.get(f"BH_SLURM_{name.upper()}")
    if value is not None:
        return value
    path = Path(user_file) if user_file is not None else USER_FILE
    if path.is_file():
        return str((yaml.safe_load(path.read_text()) or {}).get(name, "") or "")
    return ""
