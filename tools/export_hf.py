"""`dbscale export` as a script (the same options: python tools/export_hf.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("export")
