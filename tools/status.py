"""`dbscale status` as a script (the same options: python tools/status.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("status")
