"""``bigen_jax.collectives``: the bytes a device sends per step, read from a hand-written HLO module."""

import pytest

from bigen_jax import collectives

# Every collective form the parser reads, with sizes chosen so that each op's bytes are distinct. 4 devices.
HLO = """HloModule jit_step, entry_computation_layout={(f32[4,8]{1,0})->f32[]}, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body.0 (p.0: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p.0 = (s32[], f32[16]{0}) parameter(0)
  %i.0 = s32[] get-tuple-element(%p.0), index=0
  %v.0 = f32[16]{0} get-tuple-element(%p.0), index=1
  %rs.0 = f32[4]{0} reduce-scatter(%v.0), replica_groups=mesh['x'=2,'y'=2] {'x','y'}, dimensions={0}, to_apply=%add
  ROOT %t.0 = (s32[], f32[16]{0}) tuple(%i.0, %v.0)
}

%cond.0 (p.1: (s32[], f32[16])) -> pred[] {
  %p.1 = (s32[], f32[16]{0}) parameter(0)
  ROOT %c.1 = pred[] constant(true)
}

%body.2 (p.2: (s32[], s32[8])) -> (s32[], s32[8]) {
  %p.2 = (s32[], s32[8]{0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.2), index=0
  %v.2 = s32[8]{0} get-tuple-element(%p.2), index=1
  %a2a.2 = s32[8]{0} all-to-all(%v.2), replica_groups=mesh['x'=2,'y'=2] {'y'}, dimensions={0}
  ROOT %t.2 = (s32[], s32[8]{0}) tuple(%i.2, %a2a.2)
}

%cond.2 (p.3: (s32[], s32[8])) -> pred[] {
  %p.3 = (s32[], s32[8]{0}) parameter(0)
  %i.3 = s32[] get-tuple-element(%p.3), index=0
  %n.3 = s32[] constant(5)
  ROOT %lt.3 = pred[] compare(%i.3, %n.3), direction=LT
}

ENTRY %main.9 (a: f32[4,8], b: bf16[16], c: f32[8], d: f32[32], e: bf16[10], f: f32[16], g: f32[12]) -> f32[] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[16]{0} parameter(1)
  %c = f32[8]{0} parameter(2)
  %d = f32[32]{0} parameter(3)
  %e = bf16[10]{0} parameter(4)
  %f = f32[16]{0} parameter(5)
  %g = f32[12]{0} parameter(6)
  %ag = f32[8,8]{1,0} all-gather(%a), replica_groups={{0,1},{2,3}}, dimensions={0}
  %ar = (bf16[16]{0}, f32[8]{0}) all-reduce(%b, %c), replica_groups=[1,4]<=[4], to_apply=%add
  %ars = f32[32]{0} all-reduce-start(%d), replica_groups={}, to_apply=%add
  %ard = f32[32]{0} all-reduce-done(%ars)
  %cps = (bf16[10]{0}, bf16[10]{0}, u32[], u32[]) collective-permute-start(%e), source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[10]{0} collective-permute-done(%cps)
  %zero = s32[] constant(0)
  %one = s32[] constant(1)
  %init.0 = (s32[], f32[16]{0}) tuple(%zero, %f)
  %w.0 = (s32[], f32[16]) while(%init.0), condition=%cond.0, body=%body.0, backend_config={"known_trip_count":{"n":"3"}}
  %ints = s32[8]{0} constant({1, 2, 3, 4, 5, 6, 7, 8})
  %init.2 = (s32[], s32[8]{0}) tuple(%one, %ints)
  %w.2 = (s32[], s32[8]{0}) while(%init.2), condition=%cond.2, body=%body.2
  %sliced = f32[12]{0} all-reduce(%g), replica_groups=[2,2]<=[4], to_apply=%add
  %offset = s32[] constant(6)
  %half = f32[6]{0} dynamic-slice(%sliced, %offset), dynamic_slice_sizes={6}
  ROOT %out = f32[] constant(0)
}
"""

# (kind, operand bytes per execution, group size, executions, bytes sent per step by the module docstring's rules)
WANT = {
    "ag": ("all-gather", 128, 2, 1, 1 * 128),                 # f32[4,8] shard, 2 devices: (n-1) S
    "ar": ("all-reduce", 32 + 32, 4, 1, 2 * 3 / 4 * 64),      # bf16[16] + f32[8] combined, iota groups of 4
    "ars": ("all-reduce", 128, 4, 1, 2 * 3 / 4 * 128),        # async start; {} = every device
    "cps": ("collective-permute", 20, 4, 1, 20),              # bf16[10] to one target
    "rs.0": ("reduce-scatter", 64, 4, 3, 3 / 4 * 64 * 3),     # known_trip_count 3, mesh axes x and y
    "a2a.2": ("all-to-all", 32, 2, 4, 1 / 2 * 32 * 4),        # 1 <= i < 5: 4 trips, mesh axis y
    "sliced": ("all-reduce", 48, 2, 1, 2 * 1 / 2 * 48),       # [2,2]<=[4]: groups of 2
}


def test_parse_finds_every_collective_with_its_bytes_and_executions():
  ops = {op.name: op for op in collectives.parse(HLO)}
  assert sorted(ops) == sorted(WANT)
  for name, (kind, operand_bytes, group, count, sent) in WANT.items():
    op = ops[name]
    assert (op.kind, op.operand_bytes, op.group_size, op.count) == (kind, operand_bytes, group, count), name
    assert op.sent_bytes == pytest.approx(sent), name


def test_all_reduce_sliced_to_its_share_counts_as_a_reduce_scatter():
  ops = {op.name: op for op in collectives.parse(HLO, all_reduce_slices=True)}
  assert ops["sliced"].kind == "reduce-scatter"
  assert ops["sliced"].sent_bytes == pytest.approx(1 / 2 * 48)
  assert ops["ar"].kind == ops["ars"].kind == "all-reduce"  # not sliced


def test_summarise_totals_by_kind():
  totals = collectives.summarise(collectives.parse(HLO))
  assert totals["all-reduce"]["ops"] == 3
  assert totals["all-reduce"]["operand_bytes"] == 64 + 128 + 48
  assert totals["reduce-scatter"]["ops"] == 3 and totals["all-to-all"]["ops"] == 4
  assert totals["total"]["sent_bytes"] == pytest.approx(sum(w[-1] for w in WANT.values()))


def test_a_loop_of_unknown_trip_count_is_an_error():
  broken = HLO.replace("tuple(%one, %ints)", "tuple(%d, %ints)")  # the counter starts at a parameter
  with pytest.raises(ValueError, match="unknown trip count"):
    collectives.parse(broken)


@pytest.mark.parametrize("attrs,want", [
    ("replica_groups={{0,1,2,3}}", 4), ("replica_groups={{0,2},{1,3}}", 2), ("replica_groups={}", 8),
    ("channel_id=1", 8), ("replica_groups=[4,2]<=[2,4]T(1,0)", 2), ("replica_groups=mesh['a'=2,'b'=4] {'b'}", 4),
    ("replica_groups=mesh['a'=2,'b'=4] {'a','b'}", 8)])
def test_group_size(attrs, want):
  assert collectives.group_size(attrs, 8) == want


def test_shape_bytes():
  assert collectives.shape_bytes("bf16[3,5]{1,0}") == 30
  assert collectives.shape_bytes("(f32[2]{0}, pred[4], s64[])") == 8 + 4 + 8
  assert collectives.shape_bytes("token[]") == 0
