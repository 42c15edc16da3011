"""`dbscale calibrate` as a script (the same options: python tools/calibrate_noise.py --help)."""

from dbscale.commands import script

if __name__ == "__main__":
    script("calibrate")
