"""`wisp calibrate`: profile the verifier on this machine and fit its latency estimator.

    wisp calibrate [--quick] [--json] [--device cpu|cuda] [--out FILE] [--redis-url URL]

Prints the fit on held-out batch shapes (R², MAE, MAPE) and writes the coefficients to
`.wisp/estimator/<model>@<hardware>.json` (or `--out`), and with `--redis-url` to Redis, where
the verifiers of that model and hardware load them at start. See common/engine/calibrate.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_calibrate_parser(sub) -> None:
    cal = sub.add_parser("calibrate", help="profile the verifier, fit the latency estimator")
    cal.add_argument("--target", default=None, help="target model folder (default: shipped)")
    cal.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    cal.add_argument("--dtype", default=None)
    cal.add_argument("--quick", action="store_true", help="a small grid (a smoke run)")
    cal.add_argument("--repeats", type=int, default=3, help="timings per shape (median)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--out", type=Path, default=None, help="coefficients file")
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    cal.add_argument("--redis-url", default=None,
                     help="also store the coefficients in this Redis, where verifiers of this "
                          "model and hardware load them at start")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from common.engine.calibrate import GRID, QUICK_GRID, calibrate, hardware_name
    from common.engine.verifier import VerifierCore
    from common.models.loading import DEFAULT_TARGET, load_model
    from common.models.runner_factory import make_runner

    target = args.target or DEFAULT_TARGET
    model = load_model(target, args.device, args.dtype)
    core = VerifierCore(make_runner(model.model), model.eos_token_id)
    cal = calibrate(core, QUICK_GRID if args.quick else GRID, args.repeats, seed=args.seed)
    hardware = hardware_name(args.device)
    model_name = Path(target).name
    out = args.out or Path(".wisp/estimator") / f"{model_name}@{hardware}.json"
    held, fitted = cal.heldout, cal.fit_report
    report = {
        "model": model_name, "hardware": hardware, "device": args.device,
        "r2": round(held.r2, 4), "mape": round(held.mape, 4), "mae_ms": round(held.mae_ms, 3),
        "n_fit": fitted.n, "n_heldout": held.n,
        "fit_r2": round(fitted.r2, 4), "fit_mape": round(fitted.mape, 4),
        "coefficients": cal.estimator.as_dict(), "out": str(out),
        "grid": "quick" if args.quick else "full", "repeats": args.repeats,
    }
    cal.estimator.save(out, **{k: v for k, v in report.items() if k != "coefficients"})
    if args.redis_url:
        _store_in_redis(args.redis_url, model_name, hardware, cal.estimator, held)
        report["redis"] = True
    if args.json:
        print(json.dumps(report))
    else:
        c = cal.estimator
        print(f"estimator for {model_name} on {hardware} ({fitted.n} shapes fitted, "
              f"{held.n} held out)\n"
              f"  T = {c.a:.4g}·N_linear + {c.b_compute:.4g}·N_interactions + "
              f"{c.b_read:.4g}·N_cached + {c.c:.4g}  (ms)\n"
              f"  held-out: R² {held.r2:.4f}, MAE {held.mae_ms:.2f} ms, MAPE {held.mape:.1%}\n"
              f"  fitted:   R² {fitted.r2:.4f}, MAPE {fitted.mape:.1%}\n"
              f"  written to {out}")
    return 0


def _store_in_redis(url: str, model: str, hardware: str, est, held) -> None:
    import asyncio

    from common.transport.estimator_store import store_estimator
    from common.transport.service import connect_redis

    async def store() -> None:
        redis = connect_redis(url)
        try:
            await store_estimator(redis, model, hardware, est, r2=held.r2, mae_ms=held.mae_ms)
        finally:
            await redis.aclose()

    asyncio.run(store())
