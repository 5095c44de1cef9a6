"""`jaxtrain plan`: the train step compiled for a named topology, sized before it runs."""

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import pytest
from conftest import CONFIGS, REPO, build, load_config

from jaxtrain import cli, hardware, hlo, plan
from jaxtrain.errors import ConfigError

GPT = os.path.join(CONFIGS, "gpt_pysource.py")
FSDP_TENSOR = dict(data=2, fsdp=2, sequence=1, tensor=2)
DATA_PARALLEL = dict(data=8, fsdp=1, sequence=1, tensor=1)
# Injected chips: "roomy" holds any smoke config, "tiny" not even the smoke GPT's weights.
TEST_CHIPS = {
    **hardware.CHIPS,
    "roomy": hardware.Chip("cpu", memory_bytes=2**30, peak_flops_16bit=None),
    "tiny": hardware.Chip("cpu", memory_bytes=64 * 2**10, peak_flops_16bit=None),
}


def _gpt(mesh):
    return load_config("gpt_pysource", "smoke", mesh=mesh)


@pytest.fixture(scope="module")
def fsdp_tensor_plan():
    return plan.make_plan(_gpt(FSDP_TENSOR), "roomy-8", chips=TEST_CHIPS)


@pytest.fixture(scope="module")
def data_parallel_plan():
    return plan.make_plan(_gpt(DATA_PARALLEL), "tiny-8", chips=TEST_CHIPS)


def _bytes_per_device(tree):
    per_device = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return per_device


def test_state_bytes_match_a_really_initialised_sharded_state(fsdp_tensor_plan):
    config = _gpt(FSDP_TENSOR)
    _, layout, _, _ = build(config)
    real = jax.jit(layout.init, out_shardings=layout.shardings)(jax.random.key(0))
    memory = fsdp_tensor_plan["memory"]
    params, opt_state = _bytes_per_device(real.params), _bytes_per_device(real.opt_state)
    assert len(params) == 8 and set(params.values()) == {memory["parameters"]}
    assert set(opt_state.values()) == {memory["optimizer_state"]}
    # XLA's argument bytes are the whole state's shards (step and rng too) plus the batch's.
    everything = _bytes_per_device(real)
    assert set(everything.values()) == {memory["arguments"] - memory["batch"]}
    tokens = config.global_batch_size * config.data.seq_len
    assert memory["batch"] == 2 * tokens * 4 // 4  # int32 inputs and targets, split 4 ways


def test_fsdp_and_tensor_shrink_state_per_device(fsdp_tensor_plan, data_parallel_plan):
    full = data_parallel_plan["memory"]
    num_params = data_parallel_plan["num_parameters"]
    assert full["parameters"] == 4 * num_params  # float32, replicated on every device
    assert 2 * full["parameters"] <= full["optimizer_state"] < 2 * full["parameters"] + 64
    # Every weight matrix is split over fsdp x tensor = 4; only the norm scales (1% of the
    # smoke GPT's bytes) stay replicated.
    shrink = full["parameters"] / fsdp_tensor_plan["memory"]["parameters"]
    assert 3.9 < shrink <= 4
    shrink = full["optimizer_state"] / fsdp_tensor_plan["memory"]["optimizer_state"]
    assert 3.9 < shrink <= 4


def test_collectives_follow_the_parallelism(fsdp_tensor_plan, data_parallel_plan):
    assert fsdp_tensor_plan["collectives"]["all-gather"]["count"] > 0  # weights gathered
    collectives = data_parallel_plan["collectives"]
    assert "all-gather" not in collectives and "reduce-scatter" not in collectives
    # Pure data parallelism: the gradients (all float32 parameters) are summed over devices.
    assert collectives["all-reduce"]["bytes"] >= data_parallel_plan["memory"]["parameters"]


def test_flops_are_per_device_and_fit_is_judged(fsdp_tensor_plan, data_parallel_plan):
    # A forward and backward pass is about 6 FLOPs per parameter per token; each of the 8
    # devices sees 1/8 of the tokens (a global count would be 8 times larger).
    config = _gpt(DATA_PARALLEL)
    per_device_tokens = config.global_batch_size * config.data.seq_len / 8
    expected = 6 * data_parallel_plan["num_parameters"] * per_device_tokens
    assert 0.5 * expected < data_parallel_plan["flops_per_device"] < 3 * expected
    assert fsdp_tensor_plan["memory"]["fits"] is True
    memory = data_parallel_plan["memory"]
    assert memory["fits"] is False and memory["total"] > memory["capacity"] == 64 * 2**10
    text = plan.format_plan(data_parallel_plan)
    assert re.search(r"does not fit \(needs [\d.]+[KMG]iB, has 64.00KiB\)", text), text
    assert "fits (" in plan.format_plan(fsdp_tensor_plan)


def test_cli_prints_a_readable_plan_for_part_of_the_devices(capsys):
    status = cli.main(["jaxtrain", "plan", f"--config={GPT}:smoke", "--topology=cpu-4"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "plan for cpu-4: 4 cpu devices | compiled for the attached devices"
    assert "mesh {'data': 4, 'fsdp': 1, 'sequence': 1, 'tensor': 1}" in lines[1]
    assert lines[2].startswith("memory per device: parameters ") and "optimizer state" in lines[2]
    assert "(no memory limit checked for cpu)" in lines[4]
    assert lines[-1].startswith("collectives per step (result bytes per device): all-reduce x1")


def test_kv_heads_not_divisible_by_tensor_is_one_line_exit_2(capsys):
    status = cli.main(
        [
            "jaxtrain",
            "plan",
            f"--config={GPT}:smoke",
            "--topology=cpu-8",
            "--config.model.num_kv_heads=2",
            "--config.mesh.tensor=4",
        ]
    )
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line == (
        "jaxtrain: error: parameter blocks/0/attn/key/kernel of shape (64, 2, 16) "
        "cannot be split over mesh axis 'tensor' (size 4) along dimension 1 "
        "(2 is not divisible by 4)"
    )


@pytest.mark.parametrize(
    "topology, message",
    [
        ("v7x-8", "unknown chip 'v7x' in topology 'v7x-8'"),
        ("h100-8", "GPU topology 'h100-8' is written h100xGPUS[xHOSTS]"),
        ("v5e", "bad topology 'v5e': write TPU as v5e-16"),
        ("v5p-7", "v5p-N counts TensorCores, 2 per chip"),
        ("", "--topology=NAME is required"),
    ],
)
def test_bad_topology_is_one_line_exit_2(topology, message, capsys):
    status = cli.main(["jaxtrain", "plan", f"--config={GPT}:smoke", f"--topology={topology}"])
    assert status == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("jaxtrain: error: ") and message in line


@pytest.mark.parametrize(
    "name, chip, devices, hosts",
    [
        ("v5p-64", "v5p", 32, None),  # TensorCores: two per chip
        ("v4-8", "v4", 4, None),
        ("V5E-16", "v5e", 16, None),
        ("h100x8x4", "h100", 32, 4),
        ("a100_40gbx8", "a100_40gb", 8, 1),
        ("cpu-8", "cpu", 8, None),
    ],
)
def test_parse_topology(name, chip, devices, hosts):
    topology = plan.parse_topology(name)
    assert (topology.chip_name, topology.num_devices, topology.num_hosts) == (chip, devices, hosts)


def test_shape_errors_name_the_batch_and_too_few_devices_are_refused():
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by the 8 ways"):
        config = load_config("gpt_pysource", "smoke", mesh=DATA_PARALLEL, global_batch_size=12)
        plan.make_plan(config, "cpu-8")
    # This process's CPU backend started with 8 devices; 16 cannot be added afterwards.
    with pytest.raises(ConfigError, match="needs 16 CPU devices, but jax already started with 8"):
        plan.make_plan(_gpt({"data": -1}), "cpu-16")


def test_count_collectives_per_step_through_loops_async_pairs_and_tuples():
    hlo_text = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %all-gather.1 = f32[64,128]{1,0} all-gather(f32[32,128]{1,0} %p), dimensions={0}
  %ags = (bf16[8,128]{1,0:T(8,128)(2,1)}, bf16[32,128]{1,0:T(8,128)(2,1)}) all-gather-start(%x)
  %agd = bf16[32,128]{1,0:T(8,128)(2,1)} all-gather-done(%ags)
}

%never_called (p: f32[8]) -> f32[8] {
  ROOT %a2a = f32[8]{0} all-to-all(f32[8]{0} %p), dimensions={0}
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %ar = (f32[4,32]{1,0}, bf16[8]{0}, /*index=2*/f32[]) all-reduce(%a, %b, %c), to_apply=%add
  %w = (s32[], f32[64,128]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %f = f32[4]{0} fusion(%all-reduce.3), kind=kLoop, metadata={op_name="all-gather(x)"}
}
"""  # noqa: E501
    assert hlo.count_collectives(hlo_text) == {
        "all-reduce": {"count": 1, "bytes": 4 * 32 * 4 + 8 * 2 + 4},
        # Two per iteration (one sync, one async pair), three iterations.
        "all-gather": {"count": 6, "bytes": 3 * (64 * 128 * 4 + 32 * 128 * 2)},
    }


def test_cli_json_for_a_topology_larger_than_this_process(tmp_path):
    # h100x8x4 is 32 GPUs: more than this process's 8 CPU devices, so a fresh process; no
    # GPU compiler runs without a GPU, so it is simulated on 32 CPU devices.
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest forces 8 devices; the plan must choose its own
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxtrain",
            "plan",
            f"--config={GPT}:smoke",
            "--topology=h100x8x4",
            "--config.global_batch_size=64",
            "--config.mesh.fsdp=4",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["num_devices"] == 32 and result["source"] == "cpu-simulated"
    assert result["num_hosts"] == 4
    assert result["mesh"] == {"data": 8, "fsdp": 4, "sequence": 1, "tensor": 1}
    assert result["compute_dtype"] == "bfloat16"  # "auto" resolved for GPU, not for the CPU
    assert result["memory"]["fits"] is True and result["memory"]["capacity"] == 80 * 10**9
    assert result["step_time_s"]["mfu_100"] == pytest.approx(result["flops_per_device"] / 989e12)
    assert result["compiler_estimate"] is None  # only the TPU compiler gives one
    assert result["collectives"]["all-gather"]["count"] > 0


def test_a_t4_target_computes_in_float16_against_its_float16_peak():
    # A T4 has no bfloat16: "auto" is float16 there, and so is the peak MFU divides by.
    config = load_config("gpt_pysource", "smoke", mesh=dict(data=2, fsdp=1, sequence=1, tensor=1))
    result = plan.make_plan(config, "t4x2")
    assert result["compute_dtype"] == "float16"
    assert (result["peak_flops"], result["peak_dtype"]) == (65e12, "float16")
    assert result["step_time_s"]["mfu_100"] == pytest.approx(result["flops_per_device"] / 65e12)
    assert "/s float16 peak: " in plan.format_plan(result)


def test_tpu_target_without_libtpu_is_simulated_with_a_note(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "libtpu" else real_find_spec(name, *args),
    )
    result = plan.make_plan(_gpt(FSDP_TENSOR), "v5p-16")  # 8 chips: this process's 8 CPUs
    assert result["source"] == "cpu-simulated" and result["compiler_estimate"] is None
    assert any("libtpu is not installed" in note for note in result["notes"])
    assert "compiled for simulated CPU devices" in plan.format_plan(result).splitlines()[0]


# A TPU-style loop (the TPU compiler writes no known_trip_count): a counter that starts at
# a constant (through a copy), steps by 2 and stops at 6, so 3 trips; a loop whose limit is
# not a constant; a cuBLAS gemm and a cuDNN attention kernel.
LOOPS_HLO = """HloModule jit_step

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%cond (p: (s32[], f32[64,128])) -> pred[] {
  %p = (s32[], f32[64,128]{1,0}) parameter(0)
  %limit = s32[]{:T(128)} constant(6)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%limit, %i), direction=GT
}

%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %p = (s32[], f32[64,128]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %step = s32[]{:T(128)} constant(2)
  %next = s32[]{:T(128)} add(%i, %step)
  %x = f32[64,128]{1,0} get-tuple-element(%p), index=1
  %w = f32[128,128]{1,0} constant({...})
  %y = f32[64,128]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = f32[64,128]{1,0} all-reduce(%y), to_apply=%add
  ROOT %t = (s32[]{:T(128)}, f32[64,128]{1,0}) tuple(%next, %ar)
}

%cond2 (p: (s32[], s32[])) -> pred[] {
  %p = (s32[], s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] get-tuple-element(%p), index=1
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body2 (p: (s32[], s32[])) -> (s32[], s32[]) {
  %p = (s32[], s32[]) parameter(0)
  %ag = f32[64]{0} all-gather(f32[8]{0} %z), dimensions={0}
  ROOT %t = (s32[], s32[]) tuple(%i, %n)
}

ENTRY %main (x: f32[64,128], n: s32[]) -> f32[64,128] {
  %x = f32[64,128]{1,0} parameter(0)
  %n = s32[] parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  %start = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, f32[64,128]{1,0}) tuple(%start, %x)
  %loop = (s32[]{:T(128)}, f32[64,128]{1,0}) while(%init), condition=%cond, body=%body
  %init2 = (s32[], s32[]) tuple(%zero, %n)
  %loop2 = (s32[], s32[]) while(%init2), condition=%cond2, body=%body2
  %a = f32[64,128]{1,0} get-tuple-element(%loop), index=1
  %b = f32[128,32]{1,0} constant({...})
  %gemm = (f32[64,32]{1,0}, s8[1024]{0}) custom-call(f32[64,128]{1,0} %a, f32[128,32]{1,0} %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %fmha = (bf16[2,8,64,16]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %r = f32[64,128]{1,0} get-tuple-element(%loop), index=1
}
"""  # noqa: E501


def test_step_counts_read_trip_counts_from_loop_counters():
    counts = hlo.step_counts(LOOPS_HLO)
    body = 2 * 64 * 128 * 128 + 1  # the dot, and the counter's add
    gemm = 2 * 64 * 32 * 128
    # The condition's compare runs once in this count (twice more in fact: negligible).
    assert counts.flops == 3 * body + 1 + gemm + 1
    assert counts.flops_once == body + 1 + gemm + 1  # as XLA's cost analysis counts
    assert counts.collectives == {
        "all-reduce": {"count": 3, "bytes": 3 * 64 * 128 * 4},
        "all-gather": {"count": 1, "bytes": 64 * 4},  # unknown trip count: once
    }
    assert (counts.loops, counts.unknown_trip_counts) == (2, 1)
    assert counts.uncounted_kernels == {"__cudnn$fmhaSoftmax": 1}


def _conv(**kwargs):
    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs
        )

    return conv


@pytest.mark.parametrize(
    "function, shapes",
    [
        (_conv(window_strides=(1, 1), padding="SAME"), [(8, 16, 16, 8), (3, 3, 8, 16)]),
        (_conv(window_strides=(2, 2), padding="VALID"), [(8, 17, 17, 8), (3, 3, 8, 16)]),
        (
            _conv(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2)),
            [(8, 16, 16, 8), (3, 3, 8, 16)],
        ),
        (  # a transposed convolution: the input is dilated
            _conv(window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2)),
            [(8, 8, 8, 8), (3, 3, 8, 16)],
        ),
        (
            _conv(window_strides=(1, 1), padding="SAME", feature_group_count=8),
            [(8, 16, 16, 8), (3, 3, 1, 16)],
        ),
        (  # its weight and input gradients
            lambda x, w: jax.grad(
                lambda x, w: _conv(window_strides=(2, 2), padding="SAME")(x, w).sum(), (0, 1)
            )(x, w),
            [(8, 16, 16, 8), (3, 3, 8, 16)],
        ),
        (lambda a, b: jax.numpy.einsum("bij,bjk->bik", a, b), [(4, 64, 128), (4, 128, 32)]),
        (lambda a: jax.nn.softmax(a, axis=-1) * 2 + 1, [(64, 512)]),
    ],
)
def test_flops_of_each_op_are_xla_cost_analysis_flops(function, shapes):
    args = [jax.ShapeDtypeStruct(shape, jax.numpy.float32) for shape in shapes]
    compiled = jax.jit(function).lower(*args).compile()
    counts = hlo.step_counts(compiled.as_text())
    assert counts.flops > 0 and counts.loops == 0
    assert counts.flops == pytest.approx(compiled.cost_analysis()["flops"], rel=1e-6)


class _Compiled:
    """What compiled_stats reads of a compiled step: its analyses and its HLO."""

    def __init__(self, cost):
        self._cost = cost

    def cost_analysis(self):
        return self._cost

    def memory_analysis(self):
        return None

    def as_text(self):
        return LOOPS_HLO


def test_compiled_stats_add_the_loop_trips_to_xlas_flops_and_seconds():
    counts = hlo.step_counts(LOOPS_HLO)
    stats = hlo.compiled_stats(_Compiled({"flops": 4e6, "optimal_seconds": 2e-3}))
    assert stats["flops_per_step"] == 4e6 + counts.flops - counts.flops_once > 4e6
    # The missing trips are priced at the program's seconds per FLOP.
    assert stats["optimal_seconds_per_step"] == pytest.approx(2e-3 * stats["flops_per_step"] / 4e6)
    # A negative estimate (the TPU compiler gives some) is kept apart, not scaled.
    stats = hlo.compiled_stats(_Compiled({"flops": 4e6, "optimal_seconds": -24.9}))
    assert stats["optimal_seconds_invalid"] == -24.9
    assert "optimal_seconds" not in stats and "optimal_seconds_per_step" not in stats
