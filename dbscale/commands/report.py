"""Write R/report/: figures (noise partition, loss curves, throughput and memory) and an index.html.

dbscale report --run runs/demo
dbscale report --run runs/demo --eval eval.json     # include an evaluation from dbscale evaluate
"""


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--eval", help="JSON written by dbscale evaluate (default: R/report/eval.json if present)")


def execute(args, p) -> int:
    from dbscale.report import write_report

    out = write_report(args.run, args.eval)
    print(f"[report] wrote {out / 'index.html'}")
    return 0
