"""`dbscale report` as a script (the same options: python tools/report.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("report")
