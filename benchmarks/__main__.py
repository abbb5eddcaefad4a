"""CLI: ``python -m benchmarks <suite> [<suite> ...] [--quick] [--out DIR]``.

Suites are the modules in ``benchmarks/suites``; ``all`` runs every one. The machine's ceilings
are measured once per invocation and shared by all suites of that run. Each suite writes
``<out>/<suite>.json``, ``.png`` and ``.md``; the tables are printed at the end.
"""
import argparse
import os
import pkgutil
import sys

import torch

from . import harness, suites


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(suites.__path__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", help=f"suites to run ({', '.join(available())}, or 'all')")
    p.add_argument("--quick", action="store_true", help="small sizes (always on CPU)")
    p.add_argument("--out", default="bench_out", help="output folder (JSON, PNG, Markdown)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    a = p.parse_args(argv)
    if a.list or not a.suites:
        print("suites:", " ".join(available()))
        return 0
    names = available() if a.suites == ["all"] else a.suites
    unknown = [n for n in names if n not in available()]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; available: {available()}")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"measuring ceilings on {device} ...", flush=True)
    ceilings = harness.measure_ceilings(device, a.quick or device != "cuda")
    if device == "cuda":
        print("ceilings:", {k: round(v, 1) for k, v in ceilings.items()}, flush=True)
    else:
        print("ceilings: not measured on CPU (the tables' % columns stay empty)", flush=True)
    texts, failed = [], []
    for n in names:
        print(f"== suite {n}", flush=True)
        try:
            text, _ = harness.run_suite(n, device=device, quick=a.quick, out_dir=a.out, ceilings=ceilings)
            texts.append(text)
        except Exception as e:  # keep the other suites' numbers; report the failure loudly
            import traceback

            traceback.print_exc()
            failed.append(f"{n}: {type(e).__name__}: {e}")
    print("\n\n".join(texts))
    if failed:
        print("FAILED suites:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401
        kinds = "json,png,md"
    except ImportError:
        kinds = "json,md"
        print("\nno plots: matplotlib is not installed (pip install -e .[bench])")
    print("\nwrote " + ", ".join(f"{os.path.abspath(a.out)}/{n}.{{{kinds}}}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
