"""`dbscale import` as a script (the same options: python tools/import_hf.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("import")
