"""`dbscale generate` as a script (the same options: python tools/generate.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("generate")
