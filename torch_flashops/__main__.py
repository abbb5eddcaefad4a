"""``python -m torch_flashops [demo|check] [--device cpu|cuda] [demo options]``

``demo`` (default): the main job, see ``torch_flashops.demo`` (``demo --help`` lists options).
``check``: run every registered op family's self-check on the available device (small random
inputs against the plain-PyTorch oracle) and print a table: device, backend, max error,
tolerance, pass/fail. Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _check(device: str) -> int:
    import torch_flashops as fo
    from torch_flashops import _selfcheck

    if device == "cpu":
        backend = "triton (interpreter)" if fo.cpu_backend() == "triton" else "reference (plain PyTorch)"
        if fo.cpu_backend() != "triton":
            print("note: on CPU this checks the plain-PyTorch reference path; set FLASHOPS_INTERPRET=1 (before "
                  "Python starts) to check the Triton kernels in Triton's interpreter")
    else:
        backend = f"triton ({torch.cuda.get_device_name()})"
    print(f"torch_flashops self-check on {device}, backend: {backend}")
    print(f"torch {torch.__version__}; {len(fo.registered_ops())} ops registered in torch.ops.flashops\n")
    t0 = time.time()
    results = _selfcheck.run_checks(device)
    w = max([len(r.op) for _, r in results] + [10])
    print(f"{'family':<12} {'op':<{w}} {'device':<6} {'max err':>10} {'tol':>8}  result  note")
    print("-" * (w + 56))
    failed = 0
    for fam, r in results:
        failed += not r.ok
        print(f"{fam:<12} {r.op:<{w}} {device:<6} {r.max_err:>10.2e} {r.tol:>8.0e}  {'pass' if r.ok else 'FAIL':<6}  {r.note}")
    checked = {r.op.split("[")[0].split(" ")[0] for _, r in results}
    missing = sorted(set(fo.registered_ops()) - checked)
    print(f"\n{len(results) - failed}/{len(results)} checks passed in {time.time() - t0:.1f} s")
    if missing:
        print(f"ops without a self-check row: {', '.join(missing)}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m torch_flashops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("demo", "check") else "demo"
    if command == "demo":
        from . import demo

        return demo.main(argv)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a = p.parse_args(argv)
    from .demo import check_device

    device = check_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _check(device)


if __name__ == "__main__":
    sys.exit(main())
