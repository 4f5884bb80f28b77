"""Collective bytes of a partitioned XLA program, read from its HLO text: what one device sends per step.

  ops = collectives.parse(compiled.as_text())      # or the HLO right after SPMD partitioning (spmd_hlo)
  totals = collectives.summarise(ops)              # {kind: {"ops", "operand_bytes", "sent_bytes"}}

Every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (and their ``-start`` async forms;
``-done`` moves no bytes of its own) is found in the computations the entry computation runs, each counted as
many times as it executes: a ``while`` body ``known_trip_count`` times (XLA's annotation of the compiled program),
or, before XLA annotates loops, the bound of its condition's ``counter < N`` (the loops ``jax.lax.scan`` and
``fori_loop`` lower to, counter from a constant); a conditional's costliest branch. Sizes are per device (the
program is partitioned: its shapes are one device's shards).

Bytes a device sends (and receives) for one execution of an op on ``S`` operand bytes (its operands' shapes x
dtype sizes, summed over a combined op's operands) in a replica group of ``n`` devices, by the bandwidth-optimal
ring algorithms:
  all-gather          (n - 1) * S          S is this device's shard; the result is n * S
  reduce-scatter      (n - 1) / n * S      S is the whole operand; the result is S / n
  all-reduce          2 (n - 1) / n * S    a reduce-scatter, then an all-gather
  all-to-all          (n - 1) / n * S      all but its own 1/n of S leaves the device
  collective-permute  S                    to its one target
With ``all_reduce_slices=True`` an all-reduce whose every user is a ``dynamic-slice`` to 1/n of it counts as the
reduce-scatter XLA's GPU and TPU compilers make of the pair (``ReduceScatterCreator``): the SPMD partitioner
writes a sharded gradient's reduction that way, and XLA's CPU compiler keeps it (it also widens bf16 all-reduces
to f32), so its compiled program over-counts what an accelerator sends.
"""

import dataclasses
import math
import re
from typing import Iterable

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ASYNC = {f"{kind}-start": kind for kind in KINDS}
# Ops whose called computations run as part of them (``to_apply`` of reductions and all-reduces never holds a
# collective and is not followed).
_CALLERS = ("call", "fusion", "async-start", "custom-call")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z0-9]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_NAME = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op of the program: ``operand_bytes`` per device and execution, ``group_size`` devices in
  its replica group, ``count`` executions per run of the program."""
  kind: str
  name: str
  operand_bytes: float
  group_size: int
  count: int
  computation: str

  @property
  def sent_bytes(self) -> float:
    """Bytes one device sends over the program's run (the module docstring's formulas, times ``count``)."""
    n, s = self.group_size, self.operand_bytes
    per_op = {"all-gather": (n - 1) * s, "reduce-scatter": (n - 1) / n * s, "all-reduce": 2 * (n - 1) / n * s,
              "all-to-all": (n - 1) / n * s, "collective-permute": s}[self.kind]
    return per_op * self.count


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool = False


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape (``f32[8,32]{1,0}``, a tuple of them; ``token[]`` and unknown types count 0)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    size = DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at ``text[start]``."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth, close = 0, pairs[text[start]]
  for i in range(start, len(text)):
    if text[i] == text[start]:
      depth += 1
    elif text[i] == close:
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f"unbalanced {text[start]!r} in HLO line: {text[:200]}")


def _split_top(text: str) -> list[str]:
  """``text`` split at the commas outside brackets."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(text):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _instruction(line: str) -> _Instruction | None:
  """One instruction line, ``[ROOT] %name = SHAPE opcode(operands), attrs``; None for other lines."""
  match = _NAME.match(line)
  if not match:
    return None
  rest = line[match.end():]
  end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.find(" ")
  if end <= 0:
    return None
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren <= 0:
    return None
  opcode, close = rest[:paren], _closing(rest, paren)
  operands = []
  for operand in _split_top(rest[paren + 1:close]):
    operand = re.sub(r"/\*.*?\*/", "", operand).strip()
    names = re.findall(r"%([\w.\-]+)$", operand) or re.findall(r"^([\w.\-]+)$", operand.split(" ")[-1])
    operands.append(names[0] if names else operand)
  return _Instruction(match.group(2), shape, opcode, operands, rest[close + 1:], root=bool(match.group(1)))


def _computations(text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """{computation name: its instructions} and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      comps[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      inst = _instruction(line)
      if inst is not None:
        comps[current].append(inst)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def instructions(text: str) -> list[_Instruction]:
  """Every instruction of an HLO module's computations (name, result shape, opcode, operands, attributes)."""
  return [inst for insts in _computations(text)[0].values() for inst in insts]


def _attr(attrs: str, key: str) -> str | None:
  """The value of ``key=`` in an instruction's attributes (a bracketed value whole)."""
  match = re.search(rf"\b{re.escape(key)}=", attrs)
  if not match:
    return None
  start = match.end()
  if start < len(attrs) and attrs[start] in "{[(":
    return attrs[start:_closing(attrs, start) + 1]
  return re.match(r"[^,\s]*", attrs[start:]).group(0)


def group_size(attrs: str, num_devices: int) -> int:
  """Devices in each replica group of a collective: ``{{0,1},{2,3}}``, iota ``[G,n]<=[...]``, the mesh form
  ``mesh['a'=4,'b'=2] {'a'}`` (the product of the named axes), or every device (none or ``{}``)."""
  match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if match:
    sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", match.group(1))}
    names = re.findall(r"'([^']+)'", match.group(2))
    if not all(name in sizes for name in names):
      raise ValueError(f"replica groups {match.group(0)!r}: an axis not in the mesh")
    return math.prod(sizes[name] for name in names) if names else num_devices
  match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if match:
    return int(match.group(2))
  groups = _attr(attrs, "replica_groups")
  if groups:
    first = re.search(r"\{([\d,\s]*)\}", groups[1:-1])
    if first and first.group(1).strip():
      return len(first.group(1).split(","))
  return num_devices


def _trip_count(inst: _Instruction, comps: dict[str, list[_Instruction]], by_name: dict[str, _Instruction]) -> int:
  """Iterations of a ``while``: XLA's ``known_trip_count``, else ``N - start`` of a ``counter < N`` condition
  whose counter starts at a constant; raises when neither holds."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', inst.attrs)
  if known:
    return int(known.group(1))
  condition = _attr(inst.attrs, "condition").lstrip("%")
  root = next((i for i in comps.get(condition, []) if i.root), None)
  if root is not None and root.opcode == "compare" and "direction=LT" in root.attrs and len(root.operands) == 2:
    counter, bound = (by_name.get(name) for name in root.operands)
    if counter is not None and bound is not None and counter.opcode == "get-tuple-element" \
        and bound.opcode == "constant":
      index = int(_attr(counter.attrs, "index"))
      init = by_name.get(inst.operands[0])
      start = by_name.get(init.operands[index]) if init is not None and init.opcode == "tuple" else None
      if start is not None and start.opcode == "constant":
        return int(bound.operands[0]) - int(start.operands[0])
  raise ValueError(f"while {inst.name}: unknown trip count (no known_trip_count, no `counter < constant` "
                   f"condition with a constant start)")


def parse(text: str, *, all_reduce_slices: bool = False, num_devices: int | None = None) -> list[Collective]:
  """The collectives an HLO module (its text) executes, counted per run (the module docstring's rules).

  ``num_devices``: the size of a replica group written as every device (default: the module's
  ``num_partitions`` x ``replica_count``). ``all_reduce_slices``: count an all-reduce whose users are all
  dynamic-slices to 1/n of it as a reduce-scatter."""
  if num_devices is None:
    partitions = re.search(r"\bnum_partitions=(\d+)", text)
    replicas = re.search(r"\breplica_count=(\d+)", text)
    num_devices = (int(partitions.group(1)) if partitions else 1) * (int(replicas.group(1)) if replicas else 1)
  comps, entry = _computations(text)
  by_name = {inst.name: inst for insts in comps.values() for inst in insts}
  users: dict[str, list[_Instruction]] = {}
  for insts in comps.values():
    for inst in insts:
      for operand in inst.operands:
        users.setdefault(operand, []).append(inst)

  def visit(computation: str, count: int, stack: tuple[str, ...]) -> list[Collective]:
    if computation in stack:
      raise ValueError(f"computation {computation} calls itself")
    ops = []
    for inst in comps.get(computation, []):
      kind = _ASYNC.get(inst.opcode, inst.opcode if inst.opcode in KINDS else None)
      if kind is not None:
        operand_bytes = sum(shape_bytes(by_name[o].shape) for o in inst.operands if o in by_name)
        n = group_size(inst.attrs, num_devices)
        if kind == "all-reduce" and all_reduce_slices and n > 1:
          slices = users.get(inst.name, [])
          if slices and all(u.opcode == "dynamic-slice" and shape_bytes(u.shape) * n == operand_bytes
                            for u in slices):
            kind = "reduce-scatter"
        ops.append(Collective(kind, inst.name, operand_bytes, n, count, computation))
      if inst.opcode == "while":
        trips = _trip_count(inst, comps, by_name)
        ops += visit(_attr(inst.attrs, "body").lstrip("%"), count * trips, stack + (computation,))
      elif inst.opcode == "conditional":
        branches = re.findall(r"%?([\w.\-]+)", (_attr(inst.attrs, "branch_computations") or "{}")[1:-1])
        branches += [(_attr(inst.attrs, key) or "").lstrip("%") for key in ("true_computation",
                                                                            "false_computation")]
        costs = [visit(b, count, stack + (computation,)) for b in branches if b]
        ops += max(costs, key=lambda c: sum(op.sent_bytes for op in c), default=[])
      elif inst.opcode in _CALLERS:
        for key in ("calls", "to_apply", "called_computations"):
          value = _attr(inst.attrs, key)
          for called in re.findall(r"%?([\w.\-]+)", (value or "").strip("{}")):
            ops += visit(called, count, stack + (computation,))
    return ops

  return visit(entry, 1, ())


def summarise(ops: Iterable[Collective]) -> dict[str, dict[str, float]]:
  """Per kind (every kind of ``KINDS``, and ``"total"``): ops executed, operand bytes and sent bytes per device."""
  totals = {kind: {"ops": 0, "operand_bytes": 0.0, "sent_bytes": 0.0} for kind in KINDS + ("total",)}
  for op in ops:
    for key in (op.kind, "total"):
      totals[key]["ops"] += op.count
      totals[key]["operand_bytes"] += op.operand_bytes * op.count
      totals[key]["sent_bytes"] += op.sent_bytes
  return totals
