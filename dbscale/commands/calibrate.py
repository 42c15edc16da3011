"""Measure denoising loss against sigma on a prepared run and set its noise partition from it.

dbscale calibrate --run runs/tiny                       # measure, apply 'ce_levels'
dbscale calibrate --run runs/tiny --method lognormal    # reuse the measured curve
dbscale calibrate --run runs/tiny --no-apply            # measure and print only

Must run before any block job starts (the tool refuses otherwise). The curve is kept in R/calibration.json
and reused by later calls unless --remeasure; the prepare dry run and `dbscale status` show the partition.
"""

import json

from dbscale import families


def add_arguments(p) -> None:
    from dbscale.diffusion.calibrate import METHODS

    p.add_argument("--run", required=True, help="prepared run directory")
    p.add_argument("--method", choices=METHODS, default="ce_levels", help="how to turn the curve into a partition")
    p.add_argument("--steps", type=int, default=200, help="training steps of the calibration denoiser")
    p.add_argument("--layers", type=int, help="layers of the calibration denoiser (default: the first block's)")
    p.add_argument("--grid", type=int, default=25, help="sigmas at which the loss is measured (log-spaced)")
    p.add_argument("--remeasure", action="store_true", help="measure again even if R/calibration.json exists")
    p.add_argument("--no-apply", action="store_true", help="print the proposals; change nothing in the run")


def execute(args, p) -> int:

    from dbscale.diffusion.calibrate import propose
    from dbscale.files import read_json
    from dbscale.run import CALIBRATION, open_run, set_partition
    from dbscale.train.calibration import measure_loss_curve

    run = open_run(args.run)
    d = run.config.diffusion
    path = run.root / CALIBRATION
    if path.is_file() and not args.remeasure:
        curve = read_json(path, "calibration record")["curve"]
        print(f"[calibrate] reusing the curve in {path} ({curve['steps']} steps); --remeasure to measure again")
    else:
        layers = args.layers or families.layer_allocation(run.config)[0]
        print(f"[calibrate] training a {layers}-layer denoiser for {args.steps} steps over the full sigma range")
        curve = measure_loss_curve(run, args.steps, layers, args.grid)
    prepared = run.manifest.get("calibration", {}).get("prepared_config", run.config.to_dict())["diffusion"]
    proposals = propose(curve, d.num_blocks, prepared["P_mean"], prepared["P_std"])

    print(f"{'sigma':>10} {'CE':>8} {'log-normal cdf':>15}")
    for s, ce, q in zip(curve["sigma"], curve["ce"], curve["lognormal_cdf"], strict=True):
        print(f"{s:10.4f} {ce:8.3f} {q:15.4f}")
    for name, prop in proposals.items():
        print(f"[calibrate] {name:>13}: {json.dumps(prop)}")
    if args.no_apply:
        return 0
    chosen = {k: v for k, v in proposals[args.method].items() if k != "boundaries_implied"}
    run = set_partition(run, chosen, {"method": args.method, "curve": curve, "proposals": proposals})
    part = run.manifest["partition"]
    print(f"[calibrate] applied '{args.method}': boundaries {[round(b, 4) for b in part['sigma_boundaries']]}")
    return 0
