"""`dbscale launch` as a script: every block job of a run, here or over a hostfile (python launchers/launch_blocks.py
--help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("launch")
