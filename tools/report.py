"""Write R/report/: figures (noise partition, loss curves, throughput and memory) and an index.html.

python tools/report.py --run runs/demo
python tools/report.py --run runs/demo --eval eval.json     # include an evaluation from tools/evaluate.py
"""

import argparse

from dbscale.errors import cli_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--eval", help="JSON written by tools/evaluate.py (default: R/report/eval.json if present)")
    args = p.parse_args()
    from dbscale.report import write_report

    out = write_report(args.run, args.eval)
    print(f"[report] wrote {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    cli_main(main)
