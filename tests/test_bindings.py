"""Bad input at the Python/C++ boundary: every case raises ValueError or TypeError with a message a user
can act on (the kernel, the argument, the expected and the actual value), and none crashes or writes
outside a buffer. Also: kernel outputs land in the caller's own array, never in a silent copy.

The calls go to lmlab._core, the validating layer; lmlab.ops passes arguments through unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmlab import _core, ops

f32, i32 = np.float32, np.int32
B, T, C, NH, V, OC, MAXT = 2, 3, 6, 2, 5, 4, 4


def valid_calls():
    """kernel -> (ordered [(argument, value)], names of the outputs the kernel writes). One valid call
    per kernel, with small awkward shapes; tests break one argument at a time."""
    rng = np.random.default_rng(0)

    def a(*shape):
        return rng.standard_normal(shape).astype(f32)

    tok = rng.integers(0, V, (B, T)).astype(i32)
    targ = rng.integers(0, V, B * T).astype(i32)
    N = B * T
    return {
        "matmul_forward": ([("out", a(N, OC)), ("inp", a(N, C)), ("weight", a(OC, C)), ("bias", a(OC))], {"out"}),
        "matmul_backward": ([("dinp", a(N, C)), ("dweight", a(OC, C)), ("dbias", a(OC)), ("dout", a(N, OC)),
                             ("inp", a(N, C)), ("weight", a(OC, C))], {"dinp", "dweight", "dbias"}),
        "softmax_forward": ([("probs", a(N, V)), ("logits", a(N, V))], {"probs"}),
        "softmax_backward": ([("dlogits", a(N, V)), ("dprobs", a(N, V)), ("probs", a(N, V))], {"dlogits"}),
        "crossentropy_forward": ([("losses", a(N)), ("lse", a(N)), ("logits", a(N, V)), ("targets", targ)],
                                 {"losses", "lse"}),
        "crossentropy_backward": ([("dlogits", a(N, V)), ("logits", a(N, V)), ("lse", a(N)), ("targets", targ),
                                   ("weights", a(N))], {"dlogits"}),
        "layernorm_forward": ([("out", a(N, C)), ("mean", a(N)), ("rstd", a(N)), ("inp", a(N, C)),
                               ("weight", a(C)), ("bias", a(C))], {"out", "mean", "rstd"}),
        "layernorm_backward": ([("dinp", a(N, C)), ("dweight", a(C)), ("dbias", a(C)), ("dout", a(N, C)),
                                ("inp", a(N, C)), ("weight", a(C)), ("mean", a(N)), ("rstd", np.abs(a(N)))],
                               {"dinp", "dweight", "dbias"}),
        "gelu_forward": ([("out", a(N, C)), ("inp", a(N, C))], {"out"}),
        "gelu_backward": ([("dinp", a(N, C)), ("inp", a(N, C)), ("dout", a(N, C))], {"dinp"}),
        "residual_forward": ([("out", a(N, C)), ("a", a(N, C)), ("b", a(N, C))], {"out"}),
        "residual_backward": ([("da", a(N, C)), ("db", a(N, C)), ("dout", a(N, C))], {"da", "db"}),
        "attention_forward": ([("out", a(B, T, C)), ("stats", a(B, NH, T, 2)), ("qkv", a(B, T, 3 * C)), ("n_head", NH)],
                              {"out", "stats"}),
        "attention_backward": ([("dqkv", a(B, T, 3 * C)), ("dout", a(B, T, C)), ("qkv", a(B, T, 3 * C)),
                                ("stats", a(B, NH, T, 2)), ("n_head", NH)], {"dqkv"}),
        "embedding_forward": ([("out", a(B, T, C)), ("tokens", tok), ("wte", a(V, C)), ("wpe", a(MAXT, C))], {"out"}),
        "embedding_backward": ([("dwte", a(V, C)), ("dwpe", a(MAXT, C)), ("dout", a(B, T, C)), ("tokens", tok)],
                               {"dwte", "dwpe"}),
        "adamw_update": ([("params", a(N)), ("m", a(N)), ("v", np.abs(a(N))), ("grads", a(N)), ("decay_mask", np.ones(N, f32)),
                          ("lr", 1e-3), ("beta1", 0.9), ("beta2", 0.95), ("eps", 1e-8), ("weight_decay", 0.1),
                          ("grad_scale", 1.0), ("t", 1)], {"params", "m", "v"}),
        "sum_squares": ([("x", a(N))], set()),
    }


def call(kernel, args, **replace):
    values = [replace.get(name, value) for name, value in args]
    return getattr(_core, kernel)(*values)


ARRAY_ARGS = [(k, name) for k, (args, _) in valid_calls().items() for name, v in args if isinstance(v, np.ndarray)]
OUTPUT_ARGS = [(k, name) for k, (_, outs) in valid_calls().items() for name in sorted(outs)]
OPTIONAL = {("matmul_forward", "bias"), ("matmul_backward", "dinp"), ("matmul_backward", "dweight"),
            ("matmul_backward", "dbias"), ("layernorm_backward", "dweight"), ("layernorm_backward", "dbias"),
            ("embedding_backward", "dwte"), ("embedding_backward", "dwpe"), ("adamw_update", "decay_mask")}


@pytest.mark.parametrize("kernel", list(valid_calls()))
def test_valid_call_is_accepted(kernel):
    """The baseline every other case breaks: it must pass, or the failures below would prove nothing."""
    args, _ = valid_calls()[kernel]
    call(kernel, args)


def by_name(kernel):
    args, outs = valid_calls()[kernel]
    return args, outs, dict(args)


@pytest.mark.parametrize("kernel,name", ARRAY_ARGS)
def test_wrong_dtype_names_argument_and_dtype(kernel, name):
    args, _, values = by_name(kernel)
    wrong = "int64" if values[name].dtype == i32 else "float64"
    with pytest.raises(TypeError) as e:
        call(kernel, args, **{name: values[name].astype(wrong)})
    assert kernel in str(e.value) and f"'{name}'" in str(e.value) and wrong in str(e.value)
    assert ("int32" if wrong == "int64" else "float32") in str(e.value)


@pytest.mark.parametrize("kernel,name", ARRAY_ARGS)
def test_byte_swapped_float_is_rejected(kernel, name):
    args, _, values = by_name(kernel)
    swapped = values[name].astype(values[name].dtype.newbyteorder(">"))
    with pytest.raises(TypeError, match=f"'{name}'"):
        call(kernel, args, **{name: swapped})


@pytest.mark.parametrize("kernel,name", ARRAY_ARGS)
def test_non_contiguous_is_rejected(kernel, name):
    args, _, values = by_name(kernel)
    x = values[name]
    strided = np.repeat(x[..., None], 2, axis=-1)[..., 0]  # same shape and dtype, stride 2 in the last axis
    assert strided.shape == x.shape and not strided.flags.c_contiguous
    with pytest.raises(ValueError, match=f"'{name}' must be C-contiguous"):
        call(kernel, args, **{name: strided})


def test_fortran_order_is_rejected():
    args, _, values = by_name("matmul_forward")
    with pytest.raises(ValueError, match="'inp' must be C-contiguous"):
        call("matmul_forward", args, inp=np.asfortranarray(values["inp"]))


@pytest.mark.parametrize("kernel,name", OUTPUT_ARGS)
def test_read_only_output_is_rejected(kernel, name):
    args, _, values = by_name(kernel)
    ro = values[name].copy()
    ro.flags.writeable = False
    before = ro.copy()
    with pytest.raises(ValueError, match=f"'{name}'.*read-only"):
        call(kernel, args, **{name: ro})
    np.testing.assert_array_equal(ro, before)


@pytest.mark.parametrize("kernel,name", ARRAY_ARGS)
def test_zero_size_is_rejected(kernel, name):
    args, _, values = by_name(kernel)
    empty = np.zeros((0,) + values[name].shape[1:], dtype=values[name].dtype)
    with pytest.raises(ValueError, match=f"'{name}' must not be empty"):
        call(kernel, args, **{name: empty})


@pytest.mark.parametrize("kernel,name", [(k, n) for k, n in ARRAY_ARGS if k != "sum_squares"])
def test_extra_dimension_is_rejected(kernel, name):
    """A wrong ndim is caught by this argument's own check or by the shape check of one it must match.
    (sum_squares takes any shape: it sums every element.)"""
    args, _, values = by_name(kernel)
    x = values[name]
    with pytest.raises(ValueError, match="shape"):
        call(kernel, args, **{name: np.ascontiguousarray(np.stack([x, x]))})


@pytest.mark.parametrize("kernel,name", ARRAY_ARGS)
def test_list_instead_of_array_is_rejected(kernel, name):
    args, _, values = by_name(kernel)
    with pytest.raises(TypeError, match=f"^{kernel}: argument '{name}' must be a numpy array.*, got list$"):
        call(kernel, args, **{name: values[name].tolist()})


@pytest.mark.parametrize("kernel,name", [a for a in ARRAY_ARGS if a not in OPTIONAL])
def test_none_for_a_required_array_is_rejected(kernel, name):
    """(None where it is valid, for optional gradients and bias, is tested in test_kernels.py.)"""
    args, _, _ = by_name(kernel)
    with pytest.raises(TypeError, match=f"^{kernel}: argument '{name}' must be a numpy array, got NoneType$"):
        call(kernel, args, **{name: None})


# --- shape mismatches: the message names the argument, the expected and the actual shape -------------

@pytest.mark.parametrize("kernel,name,bad,expected", [
    ("matmul_forward", "out", (B * T, OC + 1), f"({B * T}, {OC})"),
    ("matmul_forward", "bias", (OC + 1,), f"({OC},)"),
    ("matmul_backward", "dweight", (OC, C + 1), f"({OC}, {C})"),
    ("matmul_backward", "dout", (B * T, OC - 1), f"({B * T}, {OC})"),
    ("softmax_backward", "dprobs", (B * T, V + 2), f"({B * T}, {V})"),
    ("crossentropy_forward", "lse", (B * T + 1,), f"({B * T},)"),
    ("crossentropy_backward", "weights", (B * T - 1,), f"({B * T},)"),
    ("layernorm_forward", "bias", (C + 1,), f"({C},)"),
    ("layernorm_backward", "rstd", (B * T + 2,), f"({B * T},)"),
    ("gelu_backward", "dout", (B * T, C + 1), f"({B * T}, {C})"),
    ("residual_forward", "b", (B * T, C - 1), f"({B * T}, {C})"),
    ("attention_forward", "stats", (B, NH, T + 1, 2), f"({B}, {NH}, {T}, 2)"),
    ("attention_backward", "stats", (B, NH, T), f"({B}, {NH}, {T}, 2)"),
    ("attention_backward", "dout", (B, T, C + 2), f"({B}, {T}, {C})"),
    ("embedding_forward", "out", (B, T + 1, C), f"({B}, {T}, {C})"),
    ("adamw_update", "grads", (B * T + 1,), f"({B * T},)"),
])
def test_shape_mismatch_message(kernel, name, bad, expected):
    args, _, _ = by_name(kernel)
    with pytest.raises(ValueError) as e:
        call(kernel, args, **{name: np.zeros(bad, f32)})
    msg = str(e.value)
    actual = str(bad) if len(bad) > 1 else f"({bad[0]},)"
    assert kernel in msg and f"'{name}'" in msg and expected in msg and actual in msg, msg


def test_weight_of_wrong_ndim_names_it():
    args, _, values = by_name("matmul_forward")
    with pytest.raises(ValueError, match=r"'weight' must be 2-D \(OC, C\), got shape \(24,\)"):
        call("matmul_forward", args, weight=values["weight"].reshape(-1))


# --- index ranges, heads, block size ----------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["crossentropy_forward", "crossentropy_backward"])
@pytest.mark.parametrize("bad", [-1, V, 2 ** 31 - 1])
def test_out_of_range_targets(kernel, bad):
    args, _, values = by_name(kernel)
    targets = values["targets"].copy()
    targets[3] = bad
    with pytest.raises(ValueError, match=rf"'targets' holds {bad} at flat position 3.*\[0, {V}\)"):
        call(kernel, args, targets=targets)


@pytest.mark.parametrize("kernel", ["embedding_forward", "embedding_backward"])
@pytest.mark.parametrize("bad", [-1, V, -2 ** 31])
def test_out_of_range_tokens(kernel, bad):
    args, outs, values = by_name(kernel)
    tokens = values["tokens"].copy()
    tokens[1, 2] = bad
    before = {name: values[name].copy() for name in outs}
    with pytest.raises(ValueError, match=rf"'tokens' holds {bad} at flat position {T + 2}"):
        call(kernel, args, tokens=tokens)
    for name in outs:  # validation happens before any write
        np.testing.assert_array_equal(values[name], before[name])


def test_embedding_backward_checks_tokens_only_against_dwte():
    """With dwte=None there is no vocabulary to index, so any token id is harmless."""
    args, _, values = by_name("embedding_backward")
    tokens = values["tokens"].copy()
    tokens[0, 0] = V + 100
    call("embedding_backward", args, dwte=None, tokens=tokens)


@pytest.mark.parametrize("kernel", ["attention_forward", "attention_backward"])
@pytest.mark.parametrize("n_head", [0, -2, 4, 5, C + 1])
def test_n_head_must_divide_C(kernel, n_head):
    args, _, _ = by_name(kernel)
    with pytest.raises(ValueError, match=rf"n_head = {n_head} must be positive and divide C = {C}"):
        call(kernel, args, n_head=n_head)


@pytest.mark.parametrize("kernel", ["attention_forward", "attention_backward"])
def test_n_head_of_wrong_type(kernel):
    args, _, _ = by_name(kernel)
    with pytest.raises(TypeError, match=kernel):
        call(kernel, args, n_head=2.5)


def test_qkv_last_dim_not_multiple_of_3():
    args, _, _ = by_name("attention_forward")
    with pytest.raises(ValueError, match="'qkv' must be \\(B, T, 3C\\).*not a multiple of 3"):
        call("attention_forward", args, qkv=np.zeros((B, T, 3 * C + 1), f32))


@pytest.mark.parametrize("kernel,name", [("embedding_forward", "wpe"), ("embedding_backward", "dwpe")])
def test_sequence_longer_than_block_size(kernel, name):
    args, _, values = by_name(kernel)
    short = np.zeros((T - 1, C), f32)  # block size T - 1 < T
    with pytest.raises(ValueError, match=rf"'{name}' must be \(maxT, {C}\) with maxT >= T = {T}, got shape \({T - 1}, {C}\)"):
        call(kernel, args, **{name: short})


@pytest.mark.parametrize("change,match", [
    ({"t": 0}, "step t must be >= 1"), ({"t": -5}, "step t must be >= 1"),
    ({"beta1": 1.0}, "beta1 and beta2"), ({"beta2": -0.1}, "beta1 and beta2"),
    ({"eps": 0.0}, "eps must be > 0"), ({"lr": float("nan")}, "finite"),
    ({"weight_decay": float("inf")}, "finite"), ({"grad_scale": float("nan")}, "finite")])
def test_adamw_bad_hyperparameters(change, match):
    args, _, _ = by_name("adamw_update")
    with pytest.raises(ValueError, match=match):
        call("adamw_update", args, **change)


# --- outputs that overlap inputs --------------------------------------------------------------------

@pytest.mark.parametrize("kernel,output,other", [
    ("gelu_forward", "out", "inp"), ("gelu_backward", "dinp", "dout"), ("residual_forward", "out", "a"),
    ("residual_backward", "da", "db"), ("softmax_forward", "probs", "logits"),
    ("softmax_backward", "dlogits", "probs"), ("crossentropy_forward", "losses", "lse"),
    ("crossentropy_backward", "dlogits", "logits"), ("layernorm_forward", "out", "inp"),
    ("layernorm_backward", "dweight", "dbias"), ("matmul_backward", "dinp", "inp"),
    ("attention_backward", "dqkv", "qkv"), ("adamw_update", "m", "v"), ("adamw_update", "params", "grads")])
def test_output_aliasing_another_argument_is_rejected(kernel, output, other):
    args, _, values = by_name(kernel)
    shared = values[other]
    with pytest.raises(ValueError, match=rf"'{output}' overlaps argument '{other}'|'{other}' overlaps argument '{output}'"):
        call(kernel, args, **{output: shared})


def test_partial_overlap_is_rejected():
    """Two views of one buffer that share only some elements."""
    buf = np.zeros(2 * B * T * C, f32)
    out, inp = buf[: B * T * C], buf[B * T * C // 2: B * T * C // 2 + B * T * C]
    with pytest.raises(ValueError, match="'out' overlaps argument 'inp'"):
        _core.gelu_forward(out, inp)


def test_adjacent_views_do_not_overlap():
    buf = np.arange(20, dtype=f32)
    out, inp = buf[:10], buf[10:]
    _core.gelu_forward(out, inp)
    assert np.all(out > 9.0)  # GELU(x) ~ x for x >= 10


def test_inputs_may_alias_each_other():
    x = np.arange(6, dtype=f32)
    out = np.zeros(6, f32)
    _core.residual_forward(out, x, x)
    np.testing.assert_array_equal(out, 2 * x)


# --- misaligned memory -------------------------------------------------------------------------------

def misaligned(x: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of x whose data starts one byte off a float boundary."""
    raw = np.zeros(x.nbytes + 1, np.uint8)
    y = np.frombuffer(raw.data, dtype=x.dtype, count=x.size, offset=1).reshape(x.shape)
    y[...] = x
    assert not y.flags.aligned and y.flags.c_contiguous
    return y


@pytest.mark.parametrize("kernel,name", [("gelu_forward", "inp"), ("matmul_forward", "weight"),
                                         ("layernorm_forward", "out"), ("crossentropy_forward", "targets")])
def test_misaligned_array_is_rejected_or_handled(kernel, name):
    """numpy can hand over arrays that are not aligned to their element size; the kernels may load them
    with aligned instructions. Either the bindings refuse them, or the result equals the aligned one."""
    args, outs, values = by_name(kernel)
    call(kernel, args)
    expected = {o: values[o].copy() for o in outs}
    odd = misaligned(values[name])
    try:
        call(kernel, args, **{name: odd})
    except ValueError as e:
        assert f"'{name}'" in str(e) and "align" in str(e)
        return
    got = {o: (odd if o == name else values[o]) for o in outs}
    for o in outs:
        np.testing.assert_array_equal(got[o], expected[o])


# --- outputs land in the caller's array ---------------------------------------------------------------

@pytest.mark.parametrize("kernel,name", OUTPUT_ARGS)
def test_output_is_written_in_place(kernel, name):
    """The output is a C-contiguous view into a larger buffer: the kernel's writes must show there, and
    the bytes around the view must stay untouched (no copy, no write past the end)."""
    args, _, values = by_name(kernel)
    x = values[name]
    sentinel = np.float32(-12345.0)
    buf = np.full(x.size + 8, sentinel, dtype=f32)
    view = buf[4:4 + x.size].reshape(x.shape)
    view[...] = x
    call(kernel, args, **{name: view})
    fresh_args, _, fresh_values = by_name(kernel)  # the same data again (seeded), for in-place updates
    expected = fresh_values[name]
    call(kernel, fresh_args)
    np.testing.assert_array_equal(view, expected)
    np.testing.assert_array_equal(buf[:4], sentinel)
    np.testing.assert_array_equal(buf[4 + x.size:], sentinel)
    assert not np.array_equal(view, x), "the kernel wrote nothing into the caller's array"


def test_ops_wrappers_return_the_callers_array():
    rng = np.random.default_rng(1)
    inp, weight = rng.standard_normal((3, 4)).astype(f32), rng.standard_normal((5, 4)).astype(f32)
    out = np.zeros((3, 5), f32)
    assert ops.matmul_forward(out, inp, weight) is out
    np.testing.assert_allclose(out, inp @ weight.T, rtol=1e-5, atol=1e-6)
    probs = np.zeros((3, 4), f32)
    assert ops.softmax_forward(probs, inp) is probs
    g = np.zeros(12, f32)
    assert ops.gelu_forward(g, inp.reshape(-1)) is g


def test_float64_output_is_refused_not_converted():
    """A converted copy would take the writes and drop them: a float64 output must raise instead."""
    out = np.zeros((3, 5))
    with pytest.raises(TypeError, match="'out' must be float32, got float64"):
        ops.matmul_forward(out, np.zeros((3, 4), f32), np.zeros((5, 4), f32))
    assert not out.any()


def test_other_bad_objects_never_crash():
    """Objects that are not numpy arrays at all, and numpy scalars, must raise TypeError."""
    for bad in ["abc", 3.0, object(), np.float32(1.0), {"a": 1}]:
        with pytest.raises(TypeError):
            _core.gelu_forward(np.zeros(3, f32), bad)
        with pytest.raises(TypeError):
            _core.sum_squares(bad)


def test_round_bf16_names_a_wrong_input_rather_than_its_own_output():
    for bad, what in ((np.ones(3), "float64"), ([1.0, 2.0], "list")):
        with pytest.raises(TypeError, match=f"x must be a float32 numpy array, got {what}"):
            ops.round_bf16(bad)
    np.testing.assert_array_equal(ops.round_bf16(np.float32([1.0, 3.0])), np.float32([1.0, 3.0]))


@pytest.mark.parametrize("change,match", [
    ({"t": 1.7}, "t must be a whole number of steps, got 1.7"), ({"t": True}, "t must be"),
    ({"lr": "0.1"}, "lr must be a number, got '0.1'"), ({"eps": None}, "eps must be a number")])
def test_ops_adamw_names_a_scalar_of_the_wrong_kind(change, match):
    """lmlab.ops.adamw_update converted its scalars itself: t=1.7 ran as step 1 (a silently
    different bias correction), lr='x' failed without naming lr."""
    from lmlab import ops
    n = 4
    p, m, v, g = np.ones(n, f32), np.zeros(n, f32), np.zeros(n, f32), np.ones(n, f32)
    kwargs = {"lr": 0.1, "t": 1, **change}
    with pytest.raises(TypeError, match=match):
        ops.adamw_update(p, m, v, g, None, **kwargs)
    assert np.array_equal(p, np.ones(n, f32))


def test_ops_name_a_scalar_of_the_wrong_kind_in_one_line():
    """n_head and accumulate of the wrong kind: pybind11's refusal listed every signature over
    several lines; the wrappers name the argument in one."""
    from lmlab import ops
    qkv, out, stats = np.ones((1, 2, 12), f32), np.empty((1, 2, 4), f32), np.empty((1, 2, 2, 2), f32)
    for bad in (2.0, "2", True):
        with pytest.raises(TypeError, match=rf"^n_head must be a whole number, got {bad!r}$"):
            ops.attention_forward(out, stats, qkv, bad)
    ops.attention_forward(out, stats, qkv, np.int64(2))
    with pytest.raises(TypeError, match=r"^n_head must be a whole number"):
        ops.attention_backward(np.zeros_like(qkv), out, qkv, stats, 2.0)
    with pytest.raises(TypeError, match=r"^accumulate must be True or False, got 'no'$"):
        ops.attention_backward(np.zeros_like(qkv), out, qkv, stats, 2, accumulate="no")
    x = np.ones(3, f32)
    with pytest.raises(TypeError, match=r"^accumulate must be True or False, got None$"):
        ops.gelu_backward(np.zeros(3, f32), x, x, accumulate=None)
    w = np.ones((2, 3), f32)
    with pytest.raises(TypeError, match=r"^accumulate must be True or False, got 0$"):
        ops.matmul_backward(np.zeros((1, 3), f32), None, None, np.ones((1, 2), f32),
                            np.ones((1, 3), f32), w, accumulate=0)


def test_ops_name_an_out_of_range_integer_or_a_non_str_name_in_one_line():
    """An n_head or step past int64, or a variant name that is not a str: pybind11 listed every
    signature over several lines instead of naming the argument."""
    from lmlab import ops
    qkv, out, stats = np.ones((1, 2, 12), f32), np.empty((1, 2, 4), f32), np.empty((1, 2, 2, 2), f32)
    with pytest.raises(ValueError, match=rf"^n_head = {2**70} is out of range$"):
        ops.attention_forward(out, stats, qkv, 2**70)
    p = np.ones(4, f32)
    with pytest.raises(ValueError, match=r"step t must be >= 1 and < 2\*\*63"):
        ops.adamw_update(p, np.zeros(4, f32), np.zeros(4, f32), p.copy(), None, lr=0.1, t=2**70)
    assert np.array_equal(p, np.ones(4, f32))
    for call in (ops.set_isa, ops.set_bf16_path):
        with pytest.raises(TypeError, match=r"must be a name \(str\), got 3$"):
            call(3)
    with pytest.raises(TypeError, match=r"^isa must be a name \(str\), got None$"):
        with ops.use_isa(None):
            pass


@pytest.mark.parametrize("shape", [(3, 5000), (2, 3, 4096), (5000, 1), (7,)])
def test_sum_squares_parts_chunks_the_elements_of_any_shape(shape):
    """sum_squares takes any shape; sum_squares_parts sliced the first axis, so a (3, 5000) buffer
    gave one chunk of all 15000 elements and then an empty slice, refused as 'must not be empty'."""
    from lmlab import ops
    x = np.random.default_rng(0).standard_normal(shape).astype(f32)
    parts = ops.sum_squares_parts(x)
    flat = x.astype(np.float64).reshape(-1)
    expected = [float(np.sum(flat[i:i + ops.SUM_SQUARES_CHUNK] ** 2))
                for i in range(0, flat.size, ops.SUM_SQUARES_CHUNK)]
    assert len(parts) == len(expected) and np.allclose(parts, expected, rtol=1e-12, atol=0)
    assert ops.norm_of_parts(parts) == ops.global_norm(x)
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.sum_squares_parts(np.ones((4, 4), f32).T)
    with pytest.raises(TypeError, match="must be a numpy array, got list"):
        ops.sum_squares_parts([1.0, 2.0])
