"""The registration helper: schema annotation, backends, fake, compile, errors."""
import re

import pytest
import torch

from torch_flashops import _config
from torch_flashops._registry import _annotate_mutations, register_op, registered_ops


@pytest.mark.parametrize(
    "schema, mutates, expected",
    [
        ("f(Tensor x, float s) -> Tensor", [], "f(Tensor x, float s) -> Tensor"),
        ("f(Tensor x, Tensor y) -> ()", ["y"], "f(Tensor x, Tensor(a!) y) -> ()"),
        ("f(Tensor x, Tensor? o, Tensor? l) -> ()", ["o", "l"], "f(Tensor x, Tensor(a!)? o, Tensor(b!)? l) -> ()"),
        ("f(Tensor[] xs, Tensor c, int n=1) -> ()", ["c"], "f(Tensor[] xs, Tensor(a!) c, int n=1) -> ()"),
    ],
    ids=["none", "one", "optional-two", "list-and-default"],
)
def test_annotate_mutations(schema, mutates, expected):
    assert _annotate_mutations(schema, mutates) == expected


def test_annotate_rejects_unknown_argument():
    with pytest.raises(ValueError, match="not Tensor arguments"):
        _annotate_mutations("f(Tensor x, int n) -> ()", ["n"])


def _scale_ref(x, s):
    return x * s


def _scale_ref_inplace(x, s):
    x.mul_(s)


_calls = []


def _scale_launcher(x, s):  # stands in for a Triton launcher: records that it was chosen
    _calls.append("launcher")
    return x * s


def _scale_launcher_inplace(x, s):
    _calls.append("launcher")
    x.mul_(s)


_OP = register_op("_test_scale(Tensor x, float s) -> Tensor", cuda=_scale_launcher, reference=_scale_ref,
                  fake=lambda x, s: torch.empty_like(x))
_OP_INPLACE = register_op("_test_scale_inplace(Tensor x, float s) -> ()", cuda=_scale_launcher_inplace,
                          reference=_scale_ref_inplace, mutates=["x"])


def test_registered_and_schema():
    rec = registered_ops()
    assert "_test_scale" in rec and rec["_test_scale_inplace"]["mutates"] == ("x",)
    assert str(_OP_INPLACE._schema) == "flashops::_test_scale_inplace(Tensor(a!) x, float s) -> ()"


def test_duplicate_and_missing_fake_rejected():
    with pytest.raises(RuntimeError, match="already registered"):
        register_op("_test_scale(Tensor x, float s) -> Tensor", cuda=_scale_launcher, reference=_scale_ref,
                    fake=lambda x, s: torch.empty_like(x))
    with pytest.raises(ValueError, match="needs a fake"):
        register_op("_test_nofake(Tensor x) -> Tensor", cuda=_scale_launcher, reference=_scale_ref)


def test_cpu_backend_switch():
    x = torch.randn(5)
    old = _config._cpu_backend
    try:
        _config.set_cpu_backend("reference")
        _calls.clear()
        torch.testing.assert_close(_OP(x, 2.0), 2 * x)
        assert _calls == []
        if _config.interpreting():
            _config.set_cpu_backend("triton")
            torch.testing.assert_close(_OP(x, 2.0), 2 * x)
            assert _calls == ["launcher"]
        else:
            with pytest.raises(ValueError, match="TRITON_INTERPRET"):
                _config.set_cpu_backend("triton")
        with pytest.raises(ValueError, match="cpu backend"):
            _config.set_cpu_backend("gpu")
    finally:
        _config._cpu_backend = old


def test_interpret_after_triton_import_warns():
    """FLASHOPS_INTERPRET=1 set after triton was imported cannot rebuild triton's own jit helpers
    for the interpreter (tl.zeros then fails inside kernels): the import says so. Imported in
    the right order, or with TRITON_INTERPRET=1 in the environment, it does not."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHOPS_INTERPRET")}
    env.update(FLASHOPS_INTERPRET="1", PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))

    def stderr(code, **extra):
        p = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, **extra}, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stderr

    assert "triton was imported before torch_flashops" in stderr("import triton, torch_flashops")
    # (a triton before 3.6 adds its own warning, that its interpreter is too old: not this one)
    assert "imported before" not in stderr("import torch_flashops, triton")
    assert "imported before" not in stderr("import triton, torch_flashops", TRITON_INTERPRET="1")


def test_import_leaves_dynamo_and_sympy_unloaded():
    """``import torch_flashops`` loads neither torch._dynamo nor sympy (about 1.5 s of import for
    eager users); the first plan() loads dynamo, as torch.compiler.disable needs it."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, torch, torch_flashops as fo\n"
            "assert 'torch._dynamo' not in sys.modules and 'sympy' not in sys.modules, 'loaded at import'\n"
            "w = fo.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))\n"
            "i = torch.tensor([0, 1], dtype=torch.int32)\n"
            "w.plan(i, i[:1], i[1:], 4, 2, 16, 4, q_data_type='float32')\n"
            "assert 'torch._dynamo' in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_opcheck():
    x = torch.randn(7, 3)
    torch.library.opcheck(_OP, (x, 3.0))
    torch.library.opcheck(_OP_INPLACE, (x.clone(), 3.0))


def test_compile_mutation_visible_no_break():
    from tests.helpers import CompileCounter

    def f(x):
        y = _OP(x, 3.0)
        _OP_INPLACE(x, 2.0)
        return y + 1

    cf = CompileCounter(f, dynamic=True)
    for n in (4, 9, 13):
        x = torch.randn(n)
        x0 = x.clone()
        y = cf(x)
        torch.testing.assert_close(x, 2 * x0)
        torch.testing.assert_close(y, 3 * x0 + 1)
    assert cf.frames == 1


def test_checks_flag(monkeypatch):
    old = _config._checks
    try:
        _config.set_checks(True)
        assert _config.checks_enabled()
        _config.set_checks(False)
        assert not _config.checks_enabled()
    finally:
        _config._checks = old


@pytest.mark.gpu
def test_gpu_eager_calls_do_not_sync():
    """The op contract's "no host syncs", eager: a second call of each family's public entry
    points (the first compiles the kernels) runs under ``torch.cuda.set_sync_debug_mode("error")``,
    which raises on any synchronising CUDA call (a blocking copy, ``.item()``, a stream sync).
    The attention wrappers plan from host page tables, as engines pass them."""
    import torch_flashops as fi

    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    T, Hq, Hkv, D, page, P = 24, 8, 2, 64, 16, 12
    q, k, v = rnd(T, Hq, D), rnd(T, Hkv, D), rnd(T, Hkv, D)
    pos = torch.arange(T, device=dev, dtype=torch.int32)
    cache = rnd(P, 2, page, Hkv, D)
    kv_indptr_h = torch.tensor([0, 1, 3], dtype=torch.int32)  # host page table: 2 requests
    kv_indices_h = torch.tensor([4, 7, 2], dtype=torch.int32)
    last_h = torch.tensor([9, 8], dtype=torch.int32)
    kv_indptr, kv_indices, last = (t.to(dev) for t in (kv_indptr_h, kv_indices_h, last_h))
    append_indptr = torch.tensor([0, 9, 24], dtype=torch.int32, device=dev)
    seq_lens = fi.get_seq_lens(kv_indptr, last, page)
    ws = torch.empty(32 << 20, dtype=torch.uint8, device=dev)
    dec = fi.BatchDecodeWithPagedKVCacheWrapper(ws)
    pre = fi.BatchPrefillWithPagedKVCacheWrapper(ws)
    E, topk, H, I = 8, 2, 64, 32
    logits = rnd(T, E, dtype=torch.float32)
    w1, w2 = rnd(E, 2 * I, H) * 0.1, rnd(E, H, I) * 0.1
    x = rnd(T, H)
    vs, ss = rnd(T, 3, Hq, D), rnd(T, 3, Hq, dtype=torch.float32)

    def calls():
        fi.apply_rope_pos_ids(q, k, pos)
        bi, ps = fi.get_batch_indices_positions(append_indptr, seq_lens, T)
        fi.append_paged_kv_cache(k, v, bi, ps, cache, kv_indices, kv_indptr, last)
        fi.merge_state(vs[:, 0], ss[:, 0], vs[:, 1], ss[:, 1])
        fi.merge_states(vs, ss)
        dec.plan(kv_indptr_h, kv_indices_h, last_h, Hq, Hkv, D, page, q_data_type=bf)
        dec.run(q[:2], cache)
        pre.plan(torch.tensor([0, 5, 7], dtype=torch.int32), kv_indptr_h, kv_indices_h, last_h, Hq, Hkv, D, page,
                 causal=True, q_data_type=bf)
        pre.run(q[:7], cache)
        fi.single_decode_with_kv_cache(q[0], k, v)
        fi.single_prefill_with_kv_cache(q, k, v, causal=True)
        wts, ids = fi.topk_softmax(logits, topk, renormalize=True)
        fi.grouped_topk(logits, topk, 4, 2)
        fi.moe_align_block_size(ids, 16, E)
        fi.fused_moe.fused_moe(x, w1, w2, wts, ids)
        fi.silu_and_mul(rnd(T, 2 * I))

    old_checks = _config._checks  # (checked mode reads data on purpose; FLASHOPS_CHECKS=1 would turn it on)
    _config.set_checks(False)
    try:
        calls()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            calls()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        _config.set_checks(old_checks)


def test_interp_memcheck_catches_out_of_bounds():
    """The CPU suite's interpreter checks (tests/interp_memcheck.py) fail a kernel that reads or
    writes past its tensors, whose programs write the same bytes with plain stores, or that reads
    another program's writes without an acquire/release atomic; masked-off lanes pass."""
    import triton
    import triton.language as tl

    from . import interp_memcheck

    if not _config.interpreting():
        pytest.skip("checks Triton's interpreter")
    assert interp_memcheck._installed

    @triton.jit
    def copy_kernel(x, y, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        if MASKED:
            tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)
        else:
            tl.store(y + offs, tl.load(x + offs))

    storage = torch.zeros(64)
    x, y = storage[:16], torch.zeros(8)
    copy_kernel[(1,)](x, y, 8, BLOCK=16, MASKED=True)  # masked lanes past y's end: fine
    with pytest.raises(Exception, match="store of 4 bytes .* outside every argument"):
        copy_kernel[(1,)](x, y, 8, BLOCK=16, MASKED=False)  # writes y[8:16]
    with pytest.raises(Exception, match="load of 4 bytes .* outside every argument"):
        copy_kernel[(1,)](torch.zeros(8), torch.zeros(16), 8, BLOCK=16, MASKED=False)
    copy_kernel[(1,)](x, torch.zeros(16), 8, BLOCK=16, MASKED=False)  # x[0:16]: inside the view
    big = torch.zeros(64)  # overlapping views: a read inside the longer one passes
    copy_kernel[(1,)](big[:32], big[4:6], 8, BLOCK=16, MASKED=True)
    copy_kernel[(1,)](big[:32], torch.zeros(16), 8, BLOCK=16, MASKED=False)
    # masks the interpreter keeps as 0/1 integers select lanes like booleans (not as indices)
    import numpy as np
    from types import SimpleNamespace as NS

    saved = interp_memcheck._ranges
    interp_memcheck._ranges = (np.array([1000], dtype=np.uint64), np.array([1040], dtype=np.uint64))
    try:
        ptrs = NS(data=np.array([1000, 1036, 1040], dtype=np.uint64))
        interp_memcheck._check("load", ptrs, NS(data=np.array([1, 1, 0], dtype=np.int32)), 4)
        with pytest.raises(interp_memcheck.OutOfBoundsAccess, match="1 of 1 active lanes"):
            interp_memcheck._check("load", ptrs, NS(data=np.array([0, 0, 1], dtype=np.int32)), 4)
    finally:
        interp_memcheck._ranges = saved
    # plain stores of two programs of one launch to the same bytes: a write-write race on a GPU
    @triton.jit
    def fill_kernel(y, SHARED: tl.constexpr):
        offs = tl.arange(0, 4) + (0 if SHARED else tl.program_id(0) * 4)
        tl.store(y + offs, tl.program_id(0).to(tl.float32) + offs * 0)

    fill_kernel[(3,)](torch.zeros(12), SHARED=False)
    with pytest.raises(interp_memcheck.WriteRace, match="written by plain stores of programs 0 and 1"):
        fill_kernel[(3,)](torch.zeros(12), SHARED=True)

    # one program reads what another wrote: a race, unless an acquire/release atomic hands it over
    @triton.jit
    def handoff_kernel(buf, out, count, SYNC: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, 4)
        if pid == 0:
            tl.store(buf + offs, offs.to(tl.float32))
        if SYNC == 1:
            if tl.atomic_add(count, 1, sem="acq_rel") == 1:  # the second to arrive reads
                tl.store(out + offs, tl.load(buf + offs))
        elif SYNC == 2:  # the same count without ordering: still a race
            if tl.atomic_add(count, 1, sem="relaxed") == 1:
                tl.store(out + offs, tl.load(buf + offs))
        elif pid == 1:
            tl.store(out + offs, tl.load(buf + offs))

    for sync in (0, 2):
        with pytest.raises(interp_memcheck.WriteRace, match="written by program 0 and read by program 1"):
            handoff_kernel[(2,)](torch.zeros(4), torch.zeros(4), torch.zeros(1, dtype=torch.int32), SYNC=sync)
    handoff_kernel[(2,)](torch.zeros(4), torch.zeros(4), torch.zeros(1, dtype=torch.int32), SYNC=1)
    if interp_memcheck._VIEWS:  # (the default) a read past the view, even inside its storage, fails
        with pytest.raises(Exception, match="load of 4 bytes .* outside every argument"):
            copy_kernel[(1,)](storage[:8], torch.zeros(16), 8, BLOCK=16, MASKED=False)

    # a scalar condition & a block one: the interpreter's int32 block, which triton 3.9 refuses as
    # a mask; the same lanes selected from the block side pass
    @triton.jit
    def scalar_and_kernel(x, y, n, flag, SCALAR_AND: tl.constexpr):
        offs = tl.arange(0, 8)
        if SCALAR_AND:
            m = (flag > 0) & (offs < n)
        else:
            m = offs < tl.where(flag > 0, n, 0)
        tl.store(y + offs, tl.load(x + offs, mask=m, other=0.0), mask=offs < 8)

    x, y = torch.randn(8), torch.full((8,), float("nan"))
    scalar_and_kernel[(1,)](x, y, 5, 1, SCALAR_AND=False)
    assert torch.equal(y, torch.cat([x[:5], torch.zeros(3)]))
    with pytest.raises(Exception, match="load mask holds int32, not booleans"):
        scalar_and_kernel[(1,)](x, y, 5, 1, SCALAR_AND=True)


def test_every_launch_passes_the_compile_options():
    """Every kernel launch in ``torch_flashops.ops`` passes ``**COMPILE_OPTIONS``, and each of
    its keys is a compile option of Triton's CUDA and HIP backends (a launch keyword that is not
    one raises ``KeyError`` at the first compile on a GPU, which no CPU run reaches)."""
    import ast
    import dataclasses
    import importlib
    import pathlib

    from torch_flashops.ops._host import COMPILE_OPTIONS

    assert COMPILE_OPTIONS == {"enable_fp_fusion": True}
    for backend, cls in (("nvidia", "CUDAOptions"), ("amd", "HIPOptions")):
        try:
            options = getattr(importlib.import_module(f"triton.backends.{backend}.compiler"), cls)
        except ImportError:  # a triton build without that backend
            continue
        assert set(COMPILE_OPTIONS) <= {f.name for f in dataclasses.fields(options)}, (backend, cls)

    ops_dir = pathlib.Path(_config.__file__).parent / "ops"
    launches, missing = 0, []
    for path in sorted(ops_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")):
                launches += 1
                if not any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == "COMPILE_OPTIONS"
                           for k in node.keywords):
                    missing.append(f"{path.name}:{node.lineno} {node.func.value.id}")
    assert launches >= 20 and not missing, (launches, missing)


def test_old_interpreter_warns():
    """Triton's interpreter before 3.6 refuses valid bf16 tensor descriptors: interpreted runs on
    such a triton warn at import, with the version; newer ones (and the pinned one) do not."""
    import warnings

    from torch_flashops._config import warn_if_interpreter_too_old

    for old in ("3.5.1", "3.4.0+git1234", "2.3.0"):
        with pytest.warns(RuntimeWarning, match=rf"needs triton >= 3\.6.*triton {re.escape(old)}'s"):
            assert warn_if_interpreter_too_old(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for new in ("3.6.0", "3.6.0rc1", "3.10.2", "4.0.0", "main"):
            assert not warn_if_interpreter_too_old(new)
    with warnings.catch_warnings(record=True):  # the installed triton: the pinned one does not warn
        warnings.simplefilter("always")
        assert warn_if_interpreter_too_old() == ((_config.triton_version() or (99, 0)) < (3, 6))  # None: a dev build


def test_gdc_stand_ins_match_tritons_own():
    """The programmatic-dependent-launch stand-ins (``ops/_triton_compat``, used on triton 3.4,
    whose own helpers do not compile) put the same ``griddepcontrol`` instructions at the same
    places among an sm_90 kernel's global loads and stores as the helpers the kernels import on
    this triton (3.5-3.8 build theirs from the same inline asm: there the whole PTX matches, debug
    line info aside; 3.9 has a dedicated op, which spares the asm's dummy register)."""
    from tests.helpers import run_without_interpreter

    out = run_without_interpreter(r'''
import importlib.util, json, os, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch_flashops.ops import _triton_compat as C

KERNEL = """
import triton, triton.language as tl

def make(launch, wait):
    @triton.jit
    def k(x, y, n, BLOCK: tl.constexpr):
        launch()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        wait()
        tl.store(y + offs, tl.load(x + offs, mask=offs < n) * 2, mask=offs < n)
    return k
"""
path = os.path.join(tempfile.mkdtemp(), "gdc_kernel.py")  # @triton.jit reads its source file
with open(path, "w") as f:
    f.write(KERNEL)
spec = importlib.util.spec_from_file_location("gdc_kernel", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
make = mod.make

def instructions(fn):
    src = ASTSource(fn, {"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"}, constexprs={(3,): 128})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    body = ptx[ptx.index(".entry"):ptx.index(".section")]  # the kernel, without the DWARF sections
    return [l.split("//")[0].strip() for l in body.splitlines()
            if l.strip() and not l.strip().startswith((".loc", ".file", "$L__", "//"))]

print(json.dumps({"native": C.NATIVE_GDC,
                  "chosen": instructions(make(C.gdc_launch_dependents, C.gdc_wait)),
                  "asm": instructions(make(C.asm_gdc_launch_dependents, C.asm_gdc_wait))}))
''')
    version = _config.triton_version() or (99, 0)  # None: a development build, taken as new
    assert out["native"] == (version >= (3, 5))  # triton's own, where they compile
    if (3, 5) <= version < (3, 9):
        assert out["chosen"] == out["asm"]

    def sync_and_memory(ptx):  # griddepcontrol, global load and global store opcodes, in order
        ops = []
        for line in ptx:
            words = line.replace(";", " ").split()
            words = words[1:] if words and words[0].startswith("@") else words  # a predicate
            if words and words[0].startswith(("griddepcontrol", "ld.global", "st.global")):
                ops.append(words[0] if words[0].startswith("grid") else ".".join(words[0].split(".")[:2]))
        return ops

    order = sync_and_memory(out["asm"])
    assert sync_and_memory(out["chosen"]) == order
    assert order == ["griddepcontrol.launch_dependents", "griddepcontrol.wait", "ld.global", "st.global"], order
