"""`dbscale evaluate` as a script (the same options: python tools/evaluate.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("evaluate")
