"""`dbscale merge` as a script (the same options: python tools/merge_blocks.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("merge")
