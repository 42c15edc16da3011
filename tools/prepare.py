"""`dbscale prepare` as a script (the same options: python tools/prepare.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("prepare")
