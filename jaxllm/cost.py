"""What a compiled train step costs per chip, as the compiler sees it (`jaxllm plan`'s `cost`): XLA's cost
analysis (flops, bytes accessed and, on TPU, the compiler's own `optimal_seconds`) and the HLO text
(result bytes of each kind of collective, bytes between device and host memory, custom kernel calls),
beside the model's useful FLOPs (the analytic formula `plan.estimate` uses too). The cost analysis
counts a while loop's body once; the HLO walk here counts an op inside a loop as many times as the
loop runs (nested loops multiply), and `step_cost` extrapolates a scanned step's flops and seconds
from the same step compiled with few unrolled layers.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax

from jaxllm.train.metrics import peak_tflops
from jaxllm.train.program import OutOfMemory, build

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
HOST_SPACE = "S(5)"  # a layout's memory space 5: host memory (TPU)

_ASYNC_DONE = {k + "-done": k for k in ("all-gather", "all-reduce", "collective-permute")}
_SYNC = {k: k for k in KINDS} | {"ragged-all-to-all": "all-to-all"}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\](\{[^}]*\})?")
_KERNEL = re.compile(r'custom_call_target="[^"]*(tpu_custom_call|triton|mosaic|cudnn)', re.IGNORECASE)
_INSTR = re.compile(r"\s+(ROOT )?%(\S+) = (.*)$")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result's shape text ("bf16[4,64]{1,0:T(8,128)}" or a tuple "(...)")
    opcode: str
    operands: list[str]
    args: str  # the text between the opcode's parentheses
    attrs: str
    root: bool

    def called(self, key: str) -> list[str]:
        m = re.search(key + r"=(\{[^}]*\}|%[^\s,]+)", self.attrs)
        return re.findall(r"%([^\s,{}]+)", m.group(1)) if m else []


def parse(text: str) -> tuple[dict[str, dict[str, Instr]], str]:
    """HLO text -> ({computation: {instruction name: Instr}} in program order, the entry's name)."""
    comps: dict[str, dict[str, Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if line.endswith("{") and not line.startswith(" ") and "%" in line and "HloModule" not in line:
            name = line.split("%", 1)[1].split(" ", 1)[0]
            current = comps.setdefault(name, {})
            entry = name if line.startswith("ENTRY") else entry
        elif line == "}":
            current = None
        elif current is not None and (m := _INSTR.match(line)):
            rest = m.group(3)
            end = _close(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
            shape, rest = rest[:end], rest[end + 1 :]
            opcode, _, rest = rest.partition("(")
            args_end = _close("(" + rest, 0) - 1
            args = rest[:args_end]
            operands = re.findall(r"%([^\s,()]+)", args)
            name = m.group(2)
            current[name] = Instr(name, shape, opcode, operands, args, rest[args_end + 1 :], bool(m.group(1)))
    return comps, entry


def _close(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text) - 1


def shapes(shape: str) -> list[tuple[float, bool]]:
    """(bytes, in host memory) of each array in a result's shape text (a tuple's elements in order)."""
    out = []
    for dtype, dims, layout in _SHAPE.findall(shape):
        if dtype == "token":
            continue
        bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+(\d+)", dtype).group(1))
        n = 1
        for d in dims.replace("<=", "").split(","):
            n *= int(d) if d.strip() else 1
        out.append((n * bits / 8, HOST_SPACE in (layout or "")))
    return out


def _bytes(shape: str) -> float:
    return sum(b for b, _ in shapes(shape))


def trip_count(loop: Instr, comp: dict[str, Instr], comps: dict[str, dict[str, Instr]]) -> int | None:
    """How many times a while loop runs: the compiler's `known_trip_count`, else read from its condition
    `i < N` (or `N > i`) with the counter's start a constant in the loop's initial tuple."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get((loop.called("condition") or [""])[0], {})
    root = compare = _root(cond)
    if root is not None and root.opcode == "fusion":  # the CPU compiler wraps the compare in a fusion
        compare = _root(comps.get((root.called("calls") or [""])[0], {}))
    direction = re.search(r"direction=(\w+)", compare.attrs) if compare is not None else None
    if direction is None or len(root.operands) != 2:
        return None
    a, b = (cond.get(x) for x in root.operands)
    op = direction.group(1)
    if a is not None and a.opcode == "constant":  # N > i
        a, b, op = b, a, {"GT": "LT", "GE": "LE"}.get(op, op)
    if a is None or a.opcode != "get-tuple-element" or op not in ("LT", "LE"):
        return None
    index = int(re.search(r"index=(\d+)", a.attrs).group(1))
    init = comp.get(loop.operands[0]) if loop.operands else None
    if init is None or init.opcode != "tuple" or index >= len(init.operands):
        return None
    start, limit = _constant(_through_copies(comp, init.operands[index])), _constant(b)
    if start is None or limit is None:
        return None
    return max(0, limit - start + (op == "LE"))


def _root(comp: dict[str, Instr]) -> Instr | None:
    return next((instr for instr in comp.values() if instr.root), None)


def _through_copies(comp: dict[str, Instr], name: str) -> Instr | None:
    instr = comp.get(name)
    while instr is not None and instr.opcode in ("copy", "bitcast") and instr.operands:
        instr = comp.get(instr.operands[0])
    return instr


def _constant(instr: Instr | None) -> int | None:
    """A scalar integer constant's value ("constant(2)"), else None."""
    if instr is None or instr.opcode != "constant" or not re.fullmatch(r"-?\d+", instr.args.strip()):
        return None
    return int(instr.args)


@dataclasses.dataclass
class Counts:
    collectives: dict[str, float]
    to_host: float = 0.0
    to_device: float = 0.0
    kernel_calls: float = 0.0  # custom kernels (Pallas, Triton, cuDNN): their flops are not in the cost analysis
    unknown_trip_counts: int = 0

    def add(self, other: Counts, times: int = 1) -> None:
        for k, v in other.collectives.items():
            self.collectives[k] = self.collectives.get(k, 0.0) + times * v
        self.to_host += times * other.to_host
        self.to_device += times * other.to_device
        self.kernel_calls += times * other.kernel_calls
        self.unknown_trip_counts += other.unknown_trip_counts


def count(text: str) -> Counts:
    """Collective result bytes by kind and device<->host bytes of one run of the program in `text`."""
    comps, entry = parse(text)
    memo: dict[str, Counts] = {}

    def walk(name: str) -> Counts:
        if name in memo:
            return memo[name]
        comp = comps.get(name, {})
        out = Counts({})
        for instr in comp.values():
            op = instr.opcode
            if op in _SYNC or op in _ASYNC_DONE:
                out.add(Counts({_SYNC.get(op) or _ASYNC_DONE[op]: _bytes(instr.shape)}))
            elif op == "fusion":
                out.add(_fused_collectives(instr, comps))
            elif op == "while":
                trips = trip_count(instr, comp, comps)
                out.unknown_trip_counts += trips is None
                out.add(walk(instr.called("body")[0]), 1 if trips is None else trips)
            elif op in ("call", "async-start"):
                for callee in instr.called("calls") + instr.called("to_apply"):
                    out.add(walk(callee))
            elif op == "conditional":  # each branch once: an upper bound
                for key in ("branch_computations", "true_computation", "false_computation"):
                    for callee in instr.called(key):
                        out.add(walk(callee))
            elif op == "custom-call" and _KERNEL.search(instr.attrs):
                out.kernel_calls += 1
            else:
                host, device = _host_transfer(instr, comp)
                out.to_host += host
                out.to_device += device
        memo[name] = out
        return out

    return walk(entry)


def _fused_collectives(fusion: Instr, comps: dict[str, dict[str, Instr]]) -> Counts:
    """Collectives the compiler fused with other ops. Its `all-reduce-scatter` fusion (an all-reduce of
    the padded operand whose result the fusion slices to this chip's shard) is a reduce-scatter: counted
    as one, with the fusion's result size."""
    inner = Counts({})
    for instr in comps.get((fusion.called("calls") or [""])[0], {}).values():
        if instr.opcode in _SYNC:
            inner.add(Counts({_SYNC[instr.opcode]: _bytes(instr.shape)}))
        elif instr.opcode == "fusion":
            inner.add(_fused_collectives(instr, comps))
    if set(inner.collectives) == {"all-reduce"} and _bytes(fusion.shape) < inner.collectives["all-reduce"]:
        return Counts({"reduce-scatter": _bytes(fusion.shape)})
    return inner


def _tuple_elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape's text ("(a, (b, c), d)" -> ["a", "(b, c)", "d"])."""
    if not shape.startswith("("):
        return [shape]
    out, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
            out.append(re.sub(r"/\*.*?\*/", "", shape[start:i]).strip())
            start = i + 1
    return out


def _host_transfer(instr: Instr, comp: dict[str, Instr]) -> tuple[float, float]:
    """(bytes to host memory, bytes to device memory) that one op moves: copies between the memory
    spaces and slices read from or written into host buffers (async forms counted at their start)."""
    op = instr.opcode

    def operand(i: int) -> tuple[float, bool]:
        source = comp.get(instr.operands[i]) if len(instr.operands) > i else None
        return (shapes(source.shape) or [(0.0, False)])[0] if source is not None else (0.0, False)

    if op == "copy-start":  # (destination, source, context)
        (dst, dst_host), (_, src_host) = shapes(instr.shape)[:2]
    elif op == "copy":
        (dst, dst_host), (_, src_host) = shapes(instr.shape)[0], operand(0)
    elif op == "dynamic-update-slice-start":  # ((buffer, update, indices...), result, context)
        (_, dst_host), (dst, src_host) = shapes(_tuple_elements(instr.shape)[0])[:2]
    elif op == "dynamic-update-slice":
        (_, dst_host), (dst, src_host) = shapes(instr.shape)[0], operand(1)
    elif op == "dynamic-slice-start":  # ((buffer, indices...), result, context)
        elems = _tuple_elements(instr.shape)
        (_, src_host), (dst, dst_host) = shapes(elems[0])[0], shapes(elems[1])[0]
    elif op == "dynamic-slice":
        (dst, dst_host), (_, src_host) = shapes(instr.shape)[0], operand(0)
    else:
        return 0.0, 0.0
    return (dst if dst_host and not src_host else 0.0), (dst if src_host and not dst_host else 0.0)


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Result bytes per chip of each kind of collective in one run of the program (all of KINDS)."""
    found = count(hlo_text).collectives
    return {k: found.get(k, 0.0) for k in KINDS}


def read(compiled: Any) -> dict[str, Any]:
    """Per-chip cost of one run of a compiled program. `flops`, `bytes_accessed` and `optimal_seconds`
    are the cost analysis' (a loop body counted once; `optimal_seconds` None where the backend gives
    none, e.g. CPU); collectives and host transfers come from the HLO with loop trip counts."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    counts = count(compiled.as_text())
    optimal = analysis.get("optimal_seconds")
    return {
        "flops": float(analysis.get("flops", 0.0)),
        "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
        "optimal_seconds": float(optimal) if optimal is not None and optimal > 0 else None,
        "collective_bytes": {k: counts.collectives.get(k, 0.0) for k in KINDS},
        "host_offload_bytes": counts.to_host + counts.to_device,
        "kernel_calls": counts.kernel_calls,
        "unknown_trip_counts": counts.unknown_trip_counts,
    }


def extrapolate(small: dict[int, dict[str, Any]], layers: int, keys: list[str]) -> dict[str, Any]:
    """`keys` of the same program at two layer counts (`small`: {layers: read(...)}) extrapolated
    linearly to `layers` (fixed part + layers x per-layer part); a dict value (collective bytes) key by key."""
    (n1, a), (n2, b) = sorted(small.items())

    def line(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else x + (layers - n1) * (y - x) / (n2 - n1)

    return {k: {j: line(a[k][j], b[k][j]) for j in a[k]} if isinstance(a[k], dict) else line(a[k], b[k]) for k in keys}


def forward_flops(m, seq: int) -> tuple[dict[str, float], float]:
    """Forward matmul FLOPs per token: per layer by matmul (causal attention, "core", counted half) and
    the output head's."""
    d, n, h, k, f = m.embed_dim, m.num_heads, m.kv_heads, m.head_size, m.mlp_dim
    per_layer = {
        "qkv": 2 * d * (n + 2 * h) * k,
        "o": 2 * n * k * d,
        "mlpwi": 2 * ((3 if m.mlp == "swiglu" else 2) - 1) * d * f,
        "mlpwo": 2 * f * d,
        "core": 4 * n * k * seq / 2,
    }
    return per_layer, 2 * d * m.vocab_size


def model_flops_per_chip(run, chips: int) -> float:
    """The step's useful FLOPs per chip: forward and backward (3x the forward) of every matmul, causal
    attention counted half, nothing the remat policy recomputes."""
    per_layer, head = forward_flops(run.model, run.data.block_size)
    tokens_per_chip = run.data.batch_size * run.data.block_size / chips
    return tokens_per_chip * 3 * (run.model.num_layers * sum(per_layer.values()) + head)


HOST_BYTES_S = 1e10  # device <-> host memory per chip, a rough figure for offloaded activations
COST_LAYERS = (1, 2)  # the unrolled layer counts a scanned step's cost is extrapolated from


def step_cost(run, mesh, compiled, analytic_step_s: float) -> dict[str, Any]:
    """The step's cost per chip as the compiler sees it: XLA's flops and bytes accessed, the TPU
    compiler's `optimal_seconds`, collective and device<->host bytes (from the HLO, loops counted as
    often as they run), the model's useful flops and what share of the compiled flops the remat policy
    adds, and an MFU bound. The cost analysis counts a loop body once, so for scanned layers flops,
    bytes and seconds come from the same step unrolled at 1 and 2 layers, extrapolated linearly to
    `num_layers` (these compiles only read cost; collectives stay the scanned program's exact count).
    Custom kernels (Pallas: splash attention) are custom calls the cost analysis does not count."""
    devices = list(mesh.devices.flat)
    got = read(compiled)
    method = "unrolled program"
    if run.model.scan_layers:
        try:
            small = {n: read(_unrolled(run, mesh, n).compile_train_step()) for n in COST_LAYERS}
        except (OutOfMemory, jax.errors.JaxRuntimeError) as e:
            method = f"scanned program: layer loop counted once (unrolled compiles failed: {str(e).splitlines()[0]})"
        else:
            keys = ["flops", "bytes_accessed", "optimal_seconds"]
            if got["unknown_trip_counts"]:  # loops the HLO walk cannot count: bytes from the unrolled ones too
                keys += ["collective_bytes", "host_offload_bytes", "kernel_calls"]
            got.update(extrapolate(small, run.model.num_layers, keys))
            method = "extrapolated from {} and {} unrolled layers".format(*COST_LAYERS)
    model = model_flops_per_chip(run, len(devices))
    optimal = got["optimal_seconds"]
    host_s = got["host_offload_bytes"] / HOST_BYTES_S
    if optimal is None:
        step_s = analytic_step_s
        method += f"; no compiler time estimate on {devices[0].platform}: step time from the analytic estimate"
    else:
        step_s = optimal + max(0.0, host_s - optimal)  # host transfers beyond what the step's own time hides
    peak = peak_tflops(devices[0])
    return {
        "method": method,
        "flops_per_chip": got["flops"],
        "model_flops_per_chip": model,
        "recompute_share": 1 - model / got["flops"] if got["flops"] else None,
        "bytes_accessed_per_chip": got["bytes_accessed"],
        "collective_bytes": got["collective_bytes"],
        "host_offload_bytes": got["host_offload_bytes"],
        "kernel_calls": got["kernel_calls"],
        "optimal_seconds": optimal,
        "estimated_step_s": step_s,
        "mfu_bound": model / (peak * 1e12 * step_s) if peak and step_s else None,
    }


def _unrolled(run, mesh, layers: int):
    """The run's program with `layers` unrolled layers (for its cost only: nothing is allocated)."""
    model = dataclasses.replace(run.model, num_layers=layers, scan_layers=False)
    return build(dataclasses.replace(run, model=model), mesh)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def table_rows(c: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The compiled step's cost as table rows (none when the step did not compile or cost was not read)."""
    if not c:
        return []
    share = c["recompute_share"]
    collectives = ", ".join(f"{k} {_si(v, 'B')}" for k, v in c["collective_bytes"].items() if v) or "none"
    optimal, step_s = c["optimal_seconds"], c["estimated_step_s"]
    mfu = "" if c["mfu_bound"] is None else f", MFU <= {100 * c['mfu_bound']:.0f}%"
    if optimal is None:
        seconds = f"none on this backend (the analytic estimate stands in: {step_s:.3g} s/step)"
    else:
        exposed = f" + {step_s - optimal:.3g} s of host transfers" if step_s > optimal else ""
        seconds = (
            f"{optimal:.3g} s/step{exposed}{mfu} (without custom kernels such as splash attention, overlap of "
            "collectives with compute, or host transfers beyond the step's own time)"
        )
    return [
        ("cost per chip", c["method"]),
        (
            "  flops",
            f"{_si(c['flops_per_chip'], 'FLOP')} compiled, {_si(c['model_flops_per_chip'], 'FLOP')} model"
            + ("" if share is None else f" ({100 * share:.0f}% recomputed or extra)")
            + (f"; {c['kernel_calls']:.0f} custom kernel calls not counted" if c["kernel_calls"] else ""),
        ),
        ("  bytes accessed", _si(c["bytes_accessed_per_chip"], "B")),
        ("  collectives (result bytes)", collectives),
        ("  host transfers", _si(c["host_offload_bytes"], "B") + " between device and host memory"),
        ("  compiler estimate", seconds),
    ]
