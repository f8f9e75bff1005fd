// The only file that knows pybind11: it validates every array (dtype, ndim, shape, contiguity,
// writability, overlap, index ranges) with the GIL held, raises a Python exception naming the argument
// and the expected vs actual value on any mismatch, then releases the GIL and calls the active kernel.
// Arrays are taken without conversion, so a kernel's writes always land in the caller's array.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "kernels.h"
#include "pieces.h"

namespace py = pybind11;
using lmlab::idx_t;

namespace {

using Shape = std::vector<idx_t>;

std::string shape_str(const Shape& s) {
    std::ostringstream os;
    os << "(";
    for (size_t i = 0; i < s.size(); i++) os << (i ? ", " : "") << s[i];
    os << (s.size() == 1 ? ",)" : ")");
    return os.str();
}

Shape shape_of(const py::array& a) {
    Shape s(a.ndim());
    for (py::ssize_t i = 0; i < a.ndim(); i++) s[i] = a.shape(i);
    return s;
}

[[noreturn]] void fail_value(const char* fn, const std::string& msg) {
    throw py::value_error(std::string(fn) + ": " + msg);
}

// One array argument of one kernel call: its checks, then a typed pointer.
struct Arg {
    const char* fn;
    const char* name;
    py::array array;

    Arg(const char* fn_, const char* name_, const py::array& a, bool is_int, bool writable)
        : fn(fn_), name(name_), array(a) {
        // Rich comparison, so '<f4', 'float32' and np.float32 all match, and a byte-swapped array does not.
        bool dtype_ok = is_int ? a.dtype().equal(py::dtype::of<std::int32_t>())
                               : a.dtype().equal(py::dtype::of<float>());
        if (!dtype_ok) {
            throw py::type_error(std::string(fn) + ": argument '" + name + "' must be " +
                                 (is_int ? "int32" : "float32") + ", got " +
                                 std::string(py::str(a.dtype())));
        }
        if (!(a.flags() & py::array::c_style))
            fail_value(fn, std::string("argument '") + name +
                               "' must be C-contiguous (use numpy.ascontiguousarray)");
        // numpy can build arrays off their element alignment (frombuffer with an offset); kernels
        // dereference float*/int32_t*, which is undefined behaviour there (UBSan flags it).
        if (reinterpret_cast<std::uintptr_t>(a.data()) % alignof(float) != 0)
            fail_value(fn, std::string("argument '") + name +
                               "' is not aligned to its 4-byte elements; pass a copy (x.copy())");
        if (writable && !a.writeable())
            fail_value(fn, std::string("argument '") + name +
                               "' is an output and must be writable, got a read-only array");
        if (a.size() == 0)
            fail_value(fn, std::string("argument '") + name + "' must not be empty, got shape " +
                               shape_str(shape_of(a)));
    }

    Shape shape() const { return shape_of(array); }
    idx_t size() const { return (idx_t)array.size(); }
    idx_t dim(int i) const { return (idx_t)array.shape(i); }
    int ndim() const { return (int)array.ndim(); }

    void expect_shape(const Shape& expected) const {
        if (shape() != expected)
            fail_value(fn, std::string("argument '") + name + "' must have shape " +
                               shape_str(expected) + ", got " + shape_str(shape()));
    }
    void expect_ndim(int lo, int hi, const char* what) const {
        if (ndim() < lo || ndim() > hi)
            fail_value(fn, std::string("argument '") + name + "' must be " + what + ", got shape " +
                               shape_str(shape()));
    }
    const char* begin() const { return static_cast<const char*>(array.data()); }
    const char* end() const { return begin() + array.nbytes(); }

    float* f32() { return static_cast<float*>(array.mutable_data()); }
    const float* cf32() const { return static_cast<const float*>(array.data()); }
    const std::int32_t* ci32() const { return static_cast<const std::int32_t*>(array.data()); }
};

// The array arguments are taken as objects, so that a list or None gets this one-line TypeError
// naming the argument instead of pybind11's list of overloads.
py::array expect_array(const char* fn, const char* name, const py::object& o, bool or_none) {
    if (!py::isinstance<py::array>(o))
        throw py::type_error(std::string(fn) + ": argument '" + name + "' must be a numpy array" +
                             (or_none ? " or None" : "") + ", got " +
                             std::string(py::str(py::type::of(o).attr("__name__"))));
    return py::reinterpret_borrow<py::array>(o);
}

Arg in_f32(const char* fn, const char* name, const py::object& a) {
    return Arg(fn, name, expect_array(fn, name, a, false), false, false);
}
Arg out_f32(const char* fn, const char* name, const py::object& a) {
    return Arg(fn, name, expect_array(fn, name, a, false), false, true);
}
Arg in_i32(const char* fn, const char* name, const py::object& a) {
    return Arg(fn, name, expect_array(fn, name, a, false), true, false);
}

using OptArg = std::optional<Arg>;

// An optional array argument: None, or an array checked like any other.
OptArg opt_f32(const char* fn, const char* name, const py::object& o, bool writable) {
    if (o.is_none()) return std::nullopt;
    return Arg(fn, name, expect_array(fn, name, o, true), false, writable);
}

float* ptr(OptArg& a) { return a ? a->f32() : nullptr; }
const float* cptr(const OptArg& a) { return a ? a->cf32() : nullptr; }

// Outputs must not share memory with any other argument: the kernels read inputs while writing.
void expect_disjoint(std::vector<const Arg*> outputs, std::vector<const Arg*> all) {
    for (const Arg* o : outputs) {
        if (o == nullptr) continue;
        for (const Arg* a : all) {
            if (a == nullptr || o == a) continue;
            if (o->begin() < a->end() && a->begin() < o->end())
                fail_value(o->fn, std::string("argument '") + o->name + "' overlaps argument '" +
                                      a->name + "' in memory; outputs need their own buffers");
        }
    }
}
const Arg* addr(const OptArg& a) { return a ? &*a : nullptr; }

Shape with_last(Shape s, idx_t last) {
    s.back() = last;
    return s;
}

// (..., C): the leading dimensions flatten into rows.
idx_t rows_of(const Arg& a, idx_t C, const char* legend) {
    a.expect_ndim(1, 16, legend);
    if (a.shape().back() != C)
        fail_value(a.fn, std::string("argument '") + a.name + "' must be " + legend + " with C = " +
                             std::to_string(C) + ", got shape " + shape_str(a.shape()));
    return a.size() / C;
}

void expect_indices(const Arg& idx, idx_t limit, const char* what) {
    const std::int32_t* p = idx.ci32();
    for (idx_t i = 0; i < idx.size(); i++) {
        if (p[i] < 0 || p[i] >= limit) {
            std::ostringstream os;
            os << "argument '" << idx.name << "' holds " << p[i] << " at flat position " << i
               << "; every entry must be a " << what << " in [0, " << limit << ")";
            fail_value(idx.fn, os.str());
        }
    }
}

// --- matmul ----------------------------------------------------------------------------------------

void matmul_forward(py::object out_, py::object inp_, py::object weight_, py::object bias_,
                    lmlab::Precision precision) {
    const char* fn = "matmul_forward";
    Arg out = out_f32(fn, "out", out_), inp = in_f32(fn, "inp", inp_);
    Arg weight = in_f32(fn, "weight", weight_);
    OptArg bias = opt_f32(fn, "bias", bias_, false);
    weight.expect_ndim(2, 2, "2-D (OC, C)");
    const idx_t OC = weight.dim(0), C = weight.dim(1);
    const idx_t N = rows_of(inp, C, "(..., C)");
    out.expect_shape(with_last(inp.shape(), OC));
    if (bias) bias->expect_shape({OC});
    expect_disjoint({&out}, {&out, &inp, &weight, addr(bias)});
    float* o = out.f32();
    const float *i = inp.cf32(), *w = weight.cf32(), *b = cptr(bias);
    py::gil_scoped_release release;
    lmlab::kernels().matmul_forward(o, i, w, b, N, C, OC, precision);
}

void matmul_backward(py::object dinp_, py::object dweight_, py::object dbias_, py::object dout_,
                     py::object inp_, py::object weight_, lmlab::Precision precision,
                     bool accumulate) {
    const char* fn = "matmul_backward";
    OptArg dinp = opt_f32(fn, "dinp", dinp_, true), dweight = opt_f32(fn, "dweight", dweight_, true);
    OptArg dbias = opt_f32(fn, "dbias", dbias_, true);
    Arg dout = in_f32(fn, "dout", dout_), inp = in_f32(fn, "inp", inp_);
    Arg weight = in_f32(fn, "weight", weight_);
    weight.expect_ndim(2, 2, "2-D (OC, C)");
    const idx_t OC = weight.dim(0), C = weight.dim(1);
    const idx_t N = rows_of(inp, C, "(..., C)");
    dout.expect_shape(with_last(inp.shape(), OC));
    if (dinp) dinp->expect_shape(inp.shape());
    if (dweight) dweight->expect_shape({OC, C});
    if (dbias) dbias->expect_shape({OC});
    std::vector<const Arg*> all{addr(dinp), addr(dweight), addr(dbias), &dout, &inp, &weight};
    expect_disjoint({addr(dinp), addr(dweight), addr(dbias)}, all);
    float *di = ptr(dinp), *dw = ptr(dweight), *db = ptr(dbias);
    const float *g = dout.cf32(), *i = inp.cf32(), *w = weight.cf32();
    py::gil_scoped_release release;
    lmlab::kernels().matmul_backward(di, dw, db, g, i, w, N, C, OC, precision, accumulate);
}

// --- softmax and cross-entropy ------------------------------------------------------------------

void softmax_forward(py::object probs_, py::object logits_) {
    const char* fn = "softmax_forward";
    Arg probs = out_f32(fn, "probs", probs_), logits = in_f32(fn, "logits", logits_);
    logits.expect_ndim(1, 16, "at least 1-D (..., V)");
    const idx_t V = logits.shape().back(), N = logits.size() / V;
    probs.expect_shape(logits.shape());
    expect_disjoint({&probs}, {&probs, &logits});
    float* p = probs.f32();
    const float* x = logits.cf32();
    py::gil_scoped_release release;
    lmlab::kernels().softmax_forward(p, x, N, V);
}

void softmax_backward(py::object dlogits_, py::object dprobs_, py::object probs_) {
    const char* fn = "softmax_backward";
    Arg dlogits = out_f32(fn, "dlogits", dlogits_), dprobs = in_f32(fn, "dprobs", dprobs_);
    Arg probs = in_f32(fn, "probs", probs_);
    probs.expect_ndim(1, 16, "at least 1-D (..., V)");
    const idx_t V = probs.shape().back(), N = probs.size() / V;
    dprobs.expect_shape(probs.shape());
    dlogits.expect_shape(probs.shape());
    expect_disjoint({&dlogits}, {&dlogits, &dprobs, &probs});
    float* dx = dlogits.f32();
    const float *dp = dprobs.cf32(), *p = probs.cf32();
    py::gil_scoped_release release;
    lmlab::kernels().softmax_backward(dx, dp, p, N, V);
}

void crossentropy_forward(py::object losses_, py::object lse_, py::object logits_, py::object targets_) {
    const char* fn = "crossentropy_forward";
    Arg losses = out_f32(fn, "losses", losses_), lse = out_f32(fn, "lse", lse_);
    Arg logits = in_f32(fn, "logits", logits_), targets = in_i32(fn, "targets", targets_);
    logits.expect_ndim(2, 16, "at least 2-D (..., V)");
    const idx_t V = logits.shape().back(), N = logits.size() / V;
    Shape rows = logits.shape();
    rows.pop_back();
    targets.expect_shape(rows);
    losses.expect_shape(rows);
    lse.expect_shape(rows);
    expect_indices(targets, V, "token id");
    expect_disjoint({&losses, &lse}, {&losses, &lse, &logits, &targets});
    float *l = losses.f32(), *s = lse.f32();
    const float* x = logits.cf32();
    const std::int32_t* t = targets.ci32();
    py::gil_scoped_release release;
    lmlab::kernels().crossentropy_forward(l, s, x, t, N, V);
}

void crossentropy_backward(py::object dlogits_, py::object logits_, py::object lse_, py::object targets_,
                           py::object weights_) {
    const char* fn = "crossentropy_backward";
    Arg dlogits = out_f32(fn, "dlogits", dlogits_), logits = in_f32(fn, "logits", logits_);
    Arg lse = in_f32(fn, "lse", lse_), targets = in_i32(fn, "targets", targets_);
    Arg weights = in_f32(fn, "weights", weights_);
    logits.expect_ndim(2, 16, "at least 2-D (..., V)");
    const idx_t V = logits.shape().back(), N = logits.size() / V;
    Shape rows = logits.shape();
    rows.pop_back();
    dlogits.expect_shape(logits.shape());
    lse.expect_shape(rows);
    targets.expect_shape(rows);
    weights.expect_shape(rows);
    expect_indices(targets, V, "token id");
    expect_disjoint({&dlogits}, {&dlogits, &logits, &lse, &targets, &weights});
    float* dx = dlogits.f32();
    const float *x = logits.cf32(), *s = lse.cf32(), *w = weights.cf32();
    const std::int32_t* t = targets.ci32();
    py::gil_scoped_release release;
    lmlab::kernels().crossentropy_backward(dx, x, s, t, w, N, V);
}

// --- layernorm -----------------------------------------------------------------------------------

void layernorm_forward(py::object out_, py::object mean_, py::object rstd_, py::object inp_,
                       py::object weight_, py::object bias_) {
    const char* fn = "layernorm_forward";
    Arg out = out_f32(fn, "out", out_), mean = out_f32(fn, "mean", mean_);
    Arg rstd = out_f32(fn, "rstd", rstd_), inp = in_f32(fn, "inp", inp_);
    Arg weight = in_f32(fn, "weight", weight_), bias = in_f32(fn, "bias", bias_);
    weight.expect_ndim(1, 1, "1-D (C,)");
    const idx_t C = weight.dim(0);
    const idx_t N = rows_of(inp, C, "(..., C)");
    bias.expect_shape({C});
    out.expect_shape(inp.shape());
    Shape rows = inp.shape();
    rows.pop_back();
    if (rows.empty()) rows.push_back(1);
    mean.expect_shape(rows);
    rstd.expect_shape(rows);
    expect_disjoint({&out, &mean, &rstd}, {&out, &mean, &rstd, &inp, &weight, &bias});
    float *o = out.f32(), *m = mean.f32(), *s = rstd.f32();
    const float *i = inp.cf32(), *w = weight.cf32(), *b = bias.cf32();
    py::gil_scoped_release release;
    lmlab::kernels().layernorm_forward(o, m, s, i, w, b, N, C);
}

void layernorm_backward(py::object dinp_, py::object dweight_, py::object dbias_, py::object dout_,
                        py::object inp_, py::object weight_, py::object mean_, py::object rstd_) {
    const char* fn = "layernorm_backward";
    Arg dinp = out_f32(fn, "dinp", dinp_);
    OptArg dweight = opt_f32(fn, "dweight", dweight_, true), dbias = opt_f32(fn, "dbias", dbias_, true);
    Arg dout = in_f32(fn, "dout", dout_), inp = in_f32(fn, "inp", inp_);
    Arg weight = in_f32(fn, "weight", weight_), mean = in_f32(fn, "mean", mean_);
    Arg rstd = in_f32(fn, "rstd", rstd_);
    weight.expect_ndim(1, 1, "1-D (C,)");
    const idx_t C = weight.dim(0);
    const idx_t N = rows_of(inp, C, "(..., C)");
    dinp.expect_shape(inp.shape());
    dout.expect_shape(inp.shape());
    if (dweight) dweight->expect_shape({C});
    if (dbias) dbias->expect_shape({C});
    Shape rows = inp.shape();
    rows.pop_back();
    if (rows.empty()) rows.push_back(1);
    mean.expect_shape(rows);
    rstd.expect_shape(rows);
    std::vector<const Arg*> all{&dinp, addr(dweight), addr(dbias), &dout, &inp, &weight, &mean, &rstd};
    expect_disjoint({&dinp, addr(dweight), addr(dbias)}, all);
    float *di = dinp.f32(), *dw = ptr(dweight), *db = ptr(dbias);
    const float *g = dout.cf32(), *i = inp.cf32(), *w = weight.cf32(), *m = mean.cf32(), *s = rstd.cf32();
    py::gil_scoped_release release;
    lmlab::kernels().layernorm_backward(di, dw, db, g, i, w, m, s, N, C);
}

// --- GELU and residual ---------------------------------------------------------------------------

void gelu_forward(py::object out_, py::object inp_) {
    const char* fn = "gelu_forward";
    Arg out = out_f32(fn, "out", out_), inp = in_f32(fn, "inp", inp_);
    out.expect_shape(inp.shape());
    expect_disjoint({&out}, {&out, &inp});
    float* o = out.f32();
    const float* i = inp.cf32();
    const idx_t N = inp.size();
    py::gil_scoped_release release;
    lmlab::kernels().gelu_forward(o, i, N);
}

void gelu_backward(py::object dinp_, py::object inp_, py::object dout_, bool accumulate) {
    const char* fn = "gelu_backward";
    Arg dinp = out_f32(fn, "dinp", dinp_), inp = in_f32(fn, "inp", inp_), dout = in_f32(fn, "dout", dout_);
    dinp.expect_shape(inp.shape());
    dout.expect_shape(inp.shape());
    expect_disjoint({&dinp}, {&dinp, &inp, &dout});
    float* di = dinp.f32();
    const float *i = inp.cf32(), *g = dout.cf32();
    const idx_t N = inp.size();
    py::gil_scoped_release release;
    lmlab::kernels().gelu_backward(di, i, g, N, accumulate);
}

void residual_forward(py::object out_, py::object a_, py::object b_) {
    const char* fn = "residual_forward";
    Arg out = out_f32(fn, "out", out_), a = in_f32(fn, "a", a_), b = in_f32(fn, "b", b_);
    b.expect_shape(a.shape());
    out.expect_shape(a.shape());
    expect_disjoint({&out}, {&out, &a, &b});
    float* o = out.f32();
    const float *pa = a.cf32(), *pb = b.cf32();
    const idx_t N = a.size();
    py::gil_scoped_release release;
    lmlab::kernels().residual_forward(o, pa, pb, N);
}

void residual_backward(py::object da_, py::object db_, py::object dout_) {
    const char* fn = "residual_backward";
    Arg da = out_f32(fn, "da", da_), db = out_f32(fn, "db", db_), dout = in_f32(fn, "dout", dout_);
    da.expect_shape(dout.shape());
    db.expect_shape(dout.shape());
    expect_disjoint({&da, &db}, {&da, &db, &dout});
    float *pa = da.f32(), *pb = db.f32();
    const float* g = dout.cf32();
    const idx_t N = dout.size();
    py::gil_scoped_release release;
    lmlab::kernels().residual_backward(pa, pb, g, N);
}

// --- attention -----------------------------------------------------------------------------------

struct AttentionDims {
    idx_t B, T, C, NH;
};

AttentionDims attention_dims(const Arg& qkv, idx_t NH) {
    qkv.expect_ndim(3, 3, "3-D (B, T, 3C)");
    const idx_t B = qkv.dim(0), T = qkv.dim(1), C3 = qkv.dim(2);
    if (C3 % 3 != 0)
        fail_value(qkv.fn, "argument 'qkv' must be (B, T, 3C), got last dimension " +
                               std::to_string(C3) + " which is not a multiple of 3");
    const idx_t C = C3 / 3;
    if (NH <= 0 || C % NH != 0)
        fail_value(qkv.fn, "n_head = " + std::to_string(NH) + " must be positive and divide C = " +
                               std::to_string(C));
    return {B, T, C, NH};
}

void attention_forward(py::object out_, py::object stats_, py::object qkv_, idx_t NH,
                       lmlab::Precision precision) {
    const char* fn = "attention_forward";
    Arg out = out_f32(fn, "out", out_), stats = out_f32(fn, "stats", stats_);
    Arg qkv = in_f32(fn, "qkv", qkv_);
    AttentionDims d = attention_dims(qkv, NH);
    out.expect_shape({d.B, d.T, d.C});
    stats.expect_shape({d.B, d.NH, d.T, 2});
    expect_disjoint({&out, &stats}, {&out, &stats, &qkv});
    float *o = out.f32(), *st = stats.f32();
    const float* x = qkv.cf32();
    py::gil_scoped_release release;
    lmlab::kernels().attention_forward(o, st, x, d.B, d.T, d.C, d.NH, precision);
}

void attention_backward(py::object dqkv_, py::object dout_, py::object qkv_, py::object stats_, idx_t NH,
                        lmlab::Precision precision, bool accumulate) {
    const char* fn = "attention_backward";
    Arg dqkv = out_f32(fn, "dqkv", dqkv_), dout = in_f32(fn, "dout", dout_);
    Arg qkv = in_f32(fn, "qkv", qkv_), stats = in_f32(fn, "stats", stats_);
    AttentionDims d = attention_dims(qkv, NH);
    dqkv.expect_shape(qkv.shape());
    dout.expect_shape({d.B, d.T, d.C});
    stats.expect_shape({d.B, d.NH, d.T, 2});
    expect_disjoint({&dqkv}, {&dqkv, &dout, &qkv, &stats});
    float* dx = dqkv.f32();
    const float *g = dout.cf32(), *x = qkv.cf32(), *st = stats.cf32();
    py::gil_scoped_release release;
    lmlab::kernels().attention_backward(dx, g, x, st, d.B, d.T, d.C, d.NH, precision, accumulate);
}

// --- embedding -----------------------------------------------------------------------------------

void embedding_forward(py::object out_, py::object tokens_, py::object wte_, py::object wpe_) {
    const char* fn = "embedding_forward";
    Arg out = out_f32(fn, "out", out_), tokens = in_i32(fn, "tokens", tokens_);
    Arg wte = in_f32(fn, "wte", wte_), wpe = in_f32(fn, "wpe", wpe_);
    wte.expect_ndim(2, 2, "2-D (V, C)");
    const idx_t V = wte.dim(0), C = wte.dim(1);
    tokens.expect_ndim(2, 2, "2-D (B, T)");
    const idx_t B = tokens.dim(0), T = tokens.dim(1);
    wpe.expect_ndim(2, 2, "2-D (maxT, C)");
    if (wpe.dim(1) != C || wpe.dim(0) < T)
        fail_value(fn, "argument 'wpe' must be (maxT, " + std::to_string(C) + ") with maxT >= T = " +
                           std::to_string(T) + ", got shape " + shape_str(wpe.shape()));
    out.expect_shape({B, T, C});
    expect_indices(tokens, V, "token id");
    expect_disjoint({&out}, {&out, &tokens, &wte, &wpe});
    float* o = out.f32();
    const std::int32_t* t = tokens.ci32();
    const float *e = wte.cf32(), *p = wpe.cf32();
    py::gil_scoped_release release;
    lmlab::kernels().embedding_forward(o, t, e, p, B, T, C);
}

void embedding_backward(py::object dwte_, py::object dwpe_, py::object dout_, py::object tokens_) {
    const char* fn = "embedding_backward";
    OptArg dwte = opt_f32(fn, "dwte", dwte_, true), dwpe = opt_f32(fn, "dwpe", dwpe_, true);
    Arg dout = in_f32(fn, "dout", dout_), tokens = in_i32(fn, "tokens", tokens_);
    tokens.expect_ndim(2, 2, "2-D (B, T)");
    const idx_t B = tokens.dim(0), T = tokens.dim(1);
    dout.expect_ndim(3, 3, "3-D (B, T, C)");
    const idx_t C = dout.dim(2);
    dout.expect_shape({B, T, C});
    if (dwte) {
        dwte->expect_ndim(2, 2, "2-D (V, C)");
        if (dwte->dim(1) != C)
            fail_value(fn, "argument 'dwte' must be (V, " + std::to_string(C) + "), got shape " +
                               shape_str(dwte->shape()));
        expect_indices(tokens, dwte->dim(0), "token id");
    }
    if (dwpe) {
        dwpe->expect_ndim(2, 2, "2-D (maxT, C)");
        if (dwpe->dim(1) != C || dwpe->dim(0) < T)
            fail_value(fn, "argument 'dwpe' must be (maxT, " + std::to_string(C) +
                               ") with maxT >= T = " + std::to_string(T) + ", got shape " +
                               shape_str(dwpe->shape()));
    }
    expect_disjoint({addr(dwte), addr(dwpe)}, {addr(dwte), addr(dwpe), &dout, &tokens});
    float *de = ptr(dwte), *dp = ptr(dwpe);
    const float* g = dout.cf32();
    const std::int32_t* t = tokens.ci32();
    py::gil_scoped_release release;
    lmlab::kernels().embedding_backward(de, dp, g, t, B, T, C);
}

// --- optimiser -----------------------------------------------------------------------------------

void adamw_update(py::object params_, py::object m_, py::object v_, py::object grads_,
                  py::object decay_mask_, float lr, float beta1, float beta2, float eps,
                  float weight_decay, float grad_scale, idx_t t) {
    const char* fn = "adamw_update";
    Arg params = out_f32(fn, "params", params_), m = out_f32(fn, "m", m_), v = out_f32(fn, "v", v_);
    Arg grads = in_f32(fn, "grads", grads_);
    OptArg mask = opt_f32(fn, "decay_mask", decay_mask_, false);
    params.expect_ndim(1, 1, "1-D (n,), the flat parameter buffer");
    m.expect_shape(params.shape());
    v.expect_shape(params.shape());
    grads.expect_shape(params.shape());
    if (mask) mask->expect_shape(params.shape());
    if (t < 1) fail_value(fn, "step t must be >= 1 (bias correction divides by 1 - beta^t), got " + std::to_string(t));
    if (!(beta1 >= 0.0f && beta1 < 1.0f) || !(beta2 >= 0.0f && beta2 < 1.0f))
        fail_value(fn, "beta1 and beta2 must lie in [0, 1)");
    if (!(eps > 0.0f) || !std::isfinite(lr) || !std::isfinite(weight_decay) || !std::isfinite(grad_scale))
        fail_value(fn, "eps must be > 0 and lr, weight_decay, grad_scale finite");
    expect_disjoint({&params, &m, &v}, {&params, &m, &v, &grads, addr(mask)});
    float *p = params.f32(), *pm = m.f32(), *pv = v.f32();
    const float *g = grads.cf32(), *dm = cptr(mask);
    const idx_t n = params.size();
    py::gil_scoped_release release;
    lmlab::kernels().adamw_update(p, pm, pv, g, dm, n, lr, beta1, beta2, eps, weight_decay, grad_scale, t);
}

double sum_squares(py::object x_) {
    Arg x = in_f32("sum_squares", "x", x_);
    const float* p = x.cf32();
    const idx_t n = x.size();
    py::gil_scoped_release release;
    return lmlab::kernels().sum_squares(p, n);
}

void round_bf16(py::object out_, py::object inp_) {
    const char* fn = "round_bf16";
    Arg out = out_f32(fn, "out", out_), inp = in_f32(fn, "inp", inp_);
    out.expect_shape(inp.shape());
    // out may be inp itself (in place); any other overlap is refused.
    if (out.begin() != inp.begin()) expect_disjoint({&out}, {&out, &inp});
    float* o = out.f32();
    const float* i = inp.cf32();
    const idx_t n = inp.size();
    py::gil_scoped_release release;
    lmlab::kernels().round_bf16(o, i, n);
}

// --- runtime -------------------------------------------------------------------------------------

const lmlab::Bf16Path kBf16Paths[] = {lmlab::Bf16Path::amx, lmlab::Bf16Path::avx512_bf16,
                                       lmlab::Bf16Path::emulated};

// "amx, avx512_bf16, emulated": every bf16 path, or those this CPU and OS can run.
std::string bf16_path_list(bool available_only) {
    std::string s;
    for (lmlab::Bf16Path p : kBf16Paths)
        if (!available_only || lmlab::bf16_path_available(p))
            s += std::string(s.empty() ? "" : ", ") + lmlab::bf16_path_name(p);
    return s;
}

// The instructions behind bf16 products in the active variant: only the AVX-512 one has native code.
std::string bf16_matmul() {
    if (std::string(lmlab::kernels().isa) != "avx512") return "emulated";
    return lmlab::bf16_path_name(lmlab::bf16_path());
}

py::dict cpu_info() {
    const char* names[8];
    int n = lmlab::available_isas(names, 8);
    py::list available;
    for (int i = 0; i < n; i++) available.append(names[i]);
    py::dict d;
    d["isa"] = lmlab::kernels().isa;
    d["available"] = available;
    d["openmp"] = lmlab::has_openmp();
    d["num_threads"] = lmlab::get_num_threads();
    // Where Precision.BF16 products run: the native path (AVX-512 variant only), or emulated.
    d["bf16_matmul"] = bf16_matmul();
    py::list paths;
    for (lmlab::Bf16Path p : kBf16Paths)
        if (lmlab::bf16_path_available(p)) paths.append(lmlab::bf16_path_name(p));
    d["bf16_paths"] = paths;
    d["bf16_path"] = lmlab::bf16_path_name(lmlab::bf16_path());
    return d;
}

void set_bf16_path(const std::string& name) {
    lmlab::Bf16Path path;
    if (!lmlab::bf16_path_from_name(name.c_str(), &path))
        throw py::value_error("set_bf16_path: unknown bf16 path '" + name + "'; the paths are " +
                              bf16_path_list(false));
    if (!lmlab::select_bf16_path(path))
        throw py::value_error("set_bf16_path: '" + name + "' is not available on this CPU/OS; available: " +
                              bf16_path_list(true));
}

std::string available_isa_list() {
    const char* names[8];
    int n = lmlab::available_isas(names, 8);
    std::string avail;
    for (int i = 0; i < n; i++) avail += std::string(i ? ", " : "") + names[i];
    return avail;
}

void set_isa(const std::string& name) {
    if (!lmlab::select_isa(name.c_str()))
        throw py::value_error("set_isa: '" + name + "' is not available on this CPU/build; available: " +
                              available_isa_list());
}

void set_num_threads(int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    lmlab::set_num_threads(n);
}

// -- byte-level BPE pieces (pieces.h) -------------------------------------------------------------

std::string_view bytes_view(const py::bytes& b) {
    char* data = nullptr;
    py::ssize_t n = 0;
    if (PyBytes_AsStringAndSize(b.ptr(), &data, &n) != 0) throw py::error_already_set();
    return std::string_view(data, static_cast<std::size_t>(n));
}

lmlab::PieceTable make_piece_table(const py::bytes& classes) {
    std::string_view c = bytes_view(classes);
    if (c.size() != 128)
        throw py::value_error("PieceTable: classes must be 128 bytes (one per ASCII character), got " +
                              std::to_string(c.size()));
    lmlab::CharClass table[128];
    for (std::size_t i = 0; i < 128; i++) {
        if (static_cast<unsigned char>(c[i]) > 3)
            throw py::value_error("PieceTable: classes[" + std::to_string(i) + "] must be 0-3 (other, "
                                  "letter, digit, space), got " + std::to_string(static_cast<int>(c[i])));
        table[i] = static_cast<lmlab::CharClass>(c[i]);
    }
    return lmlab::PieceTable(table);
}

// (ids as int32, []) when every piece is in the table, else (None, [each missing piece's bytes]).
py::tuple piece_table_encode(const lmlab::PieceTable& table, const py::bytes& text,
                             const py::object& lengths_or_none) {
    std::string_view t = bytes_view(text);
    const std::int64_t* lens = nullptr;
    std::size_t n_lens = 0;
    py::array_t<std::int64_t, py::array::c_style> lengths_arr;
    if (!lengths_or_none.is_none()) {
        if (!py::isinstance<py::array>(lengths_or_none))
            throw py::type_error("PieceTable.encode: lengths must be a 1-D int64 array or None");
        auto lengths = lengths_or_none.cast<py::array>();
        if (!lengths.dtype().equal(py::dtype::of<std::int64_t>()) || lengths.ndim() != 1)
            throw py::type_error("PieceTable.encode: lengths must be a 1-D int64 array, got " +
                                 std::string(py::str(lengths.dtype())) + " with shape " +
                                 shape_str(shape_of(lengths)));
        lengths_arr = py::array_t<std::int64_t, py::array::c_style>::ensure(lengths);
        lens = lengths_arr.data();
        n_lens = static_cast<std::size_t>(lengths_arr.size());
        std::int64_t total = 0;
        for (std::size_t k = 0; k < n_lens; k++) {
            if (lens[k] <= 0)
                throw py::value_error("PieceTable.encode: lengths[" + std::to_string(k) +
                                      "] must be > 0 (a piece has bytes), got " + std::to_string(lens[k]));
            total += lens[k];
        }
        if (total != static_cast<std::int64_t>(t.size()))
            throw py::value_error("PieceTable.encode: lengths sum to " + std::to_string(total) +
                                  " but text has " + std::to_string(t.size()) + " bytes");
    } else {
        for (std::size_t i = 0; i < t.size(); i++)
            if (static_cast<unsigned char>(t[i]) >= 0x80)
                throw py::value_error("PieceTable.encode: text must be ASCII when no lengths are given, "
                                      "got byte " + std::to_string(static_cast<unsigned char>(t[i])) +
                                      " at offset " + std::to_string(i));
    }
    std::vector<std::int32_t> ids;
    std::vector<lmlab::Span> missing;
    bool whole;
    {
        py::gil_scoped_release release;
        ids.reserve(t.size() / 3 + 16);
        whole = table.encode(t.data(), t.size(), lens, n_lens, ids, missing);
    }
    if (!whole) {
        py::list pieces;
        for (const lmlab::Span& s : missing) pieces.append(py::bytes(t.data() + s.start, s.length));
        return py::make_tuple(py::none(), pieces);
    }
    py::array_t<std::int32_t> out(static_cast<py::ssize_t>(ids.size()));
    std::copy(ids.begin(), ids.end(), out.mutable_data());
    return py::make_tuple(out, py::list());
}

void piece_table_add(lmlab::PieceTable& table, const py::list& pieces, const py::array& ids,
                     const py::array& counts) {
    if (!ids.dtype().equal(py::dtype::of<std::int32_t>()) || ids.ndim() != 1)
        throw py::type_error("PieceTable.add: ids must be a 1-D int32 array");
    if (!counts.dtype().equal(py::dtype::of<std::int64_t>()) || counts.ndim() != 1)
        throw py::type_error("PieceTable.add: counts must be a 1-D int64 array");
    auto id = py::array_t<std::int32_t, py::array::c_style>::ensure(ids);
    auto count = py::array_t<std::int64_t, py::array::c_style>::ensure(counts);
    if (static_cast<std::size_t>(count.size()) != pieces.size())
        throw py::value_error("PieceTable.add: " + std::to_string(pieces.size()) + " pieces but " +
                              std::to_string(count.size()) + " counts");
    // Every check before the first piece goes in: a refused call leaves the table as it was.
    std::int64_t total = 0;
    for (py::ssize_t k = 0; k < count.size(); k++) {
        std::int64_t c = count.data()[k];
        if (c <= 0)
            throw py::value_error("PieceTable.add: counts[" + std::to_string(k) + "] must be > 0, got " +
                                  std::to_string(c));
        if (!py::isinstance<py::bytes>(pieces[k]))
            throw py::type_error("PieceTable.add: pieces[" + std::to_string(k) + "] must be bytes");
        total += c;
    }
    if (total != id.size())
        throw py::value_error("PieceTable.add: counts sum to " + std::to_string(total) + " but there are " +
                              std::to_string(id.size()) + " ids");
    std::int64_t at = 0;
    for (py::ssize_t k = 0; k < count.size(); k++) {
        std::string_view p = bytes_view(pieces[k].cast<py::bytes>());
        table.add(p.data(), p.size(), id.data() + at, static_cast<std::size_t>(count.data()[k]));
        at += count.data()[k];
    }
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "lmlab's compiled kernels (private: use lmlab.ops)";
    // How matmul and attention products multiply (Precision in cpp/kernels.h).
    py::enum_<lmlab::Precision>(m, "Precision")
        .value("FP32", lmlab::Precision::fp32)
        .value("BF16", lmlab::Precision::bf16);
    // LMLAB_BF16 forces a bf16 path for the process (tests run each path on a CPU that has it); a
    // path this CPU lacks fails the import, rather than silently measuring another one.
    if (const char* forced = std::getenv("LMLAB_BF16"); forced != nullptr && forced[0] != '\0') {
        lmlab::Bf16Path path;
        if (!lmlab::bf16_path_from_name(forced, &path))
            throw py::import_error(std::string("LMLAB_BF16='") + forced +
                                   "' names no bf16 path; the paths are " + bf16_path_list(false));
        if (!lmlab::select_bf16_path(path))
            throw py::import_error(std::string("LMLAB_BF16='") + forced +
                                   "': this CPU/OS cannot run it; available here: " +
                                   bf16_path_list(true));
    }
    // LMLAB_ISA forces a kernel variant for the process, with the same rule.
    if (const char* forced = std::getenv("LMLAB_ISA"); forced != nullptr && forced[0] != '\0') {
        if (!lmlab::select_isa(forced))
            throw py::import_error(std::string("LMLAB_ISA='") + forced +
                                   "' names no kernel variant this CPU and build can run; "
                                   "available here: " + available_isa_list());
    }
    auto a = [](const char* name) { return py::arg(name).noconvert(); };
    auto o = [](const char* name) { return py::arg(name).none(true); };
    const auto fp32 = lmlab::Precision::fp32;
    m.def("matmul_forward", &matmul_forward, a("out"), a("inp"), a("weight"), o("bias"),
          py::arg("precision") = fp32);
    m.def("matmul_backward", &matmul_backward, o("dinp"), o("dweight"), o("dbias"), a("dout"), a("inp"),
          a("weight"), py::arg("precision") = fp32, py::arg("accumulate") = true);
    m.def("softmax_forward", &softmax_forward, a("probs"), a("logits"));
    m.def("softmax_backward", &softmax_backward, a("dlogits"), a("dprobs"), a("probs"));
    m.def("crossentropy_forward", &crossentropy_forward, a("losses"), a("lse"), a("logits"), a("targets"));
    m.def("crossentropy_backward", &crossentropy_backward, a("dlogits"), a("logits"), a("lse"), a("targets"), a("weights"));
    m.def("layernorm_forward", &layernorm_forward, a("out"), a("mean"), a("rstd"), a("inp"), a("weight"), a("bias"));
    m.def("layernorm_backward", &layernorm_backward, a("dinp"), o("dweight"), o("dbias"), a("dout"), a("inp"), a("weight"), a("mean"), a("rstd"));
    m.def("gelu_forward", &gelu_forward, a("out"), a("inp"));
    m.def("gelu_backward", &gelu_backward, a("dinp"), a("inp"), a("dout"), py::arg("accumulate") = true);
    m.def("residual_forward", &residual_forward, a("out"), a("a"), a("b"));
    m.def("residual_backward", &residual_backward, a("da"), a("db"), a("dout"));
    m.def("attention_forward", &attention_forward, a("out"), a("stats"), a("qkv"), py::arg("n_head"),
          py::arg("precision") = fp32);
    m.def("attention_backward", &attention_backward, a("dqkv"), a("dout"), a("qkv"), a("stats"), py::arg("n_head"),
          py::arg("precision") = fp32, py::arg("accumulate") = true);
    m.def("embedding_forward", &embedding_forward, a("out"), a("tokens"), a("wte"), a("wpe"));
    m.def("embedding_backward", &embedding_backward, o("dwte"), o("dwpe"), a("dout"), a("tokens"));
    m.def("adamw_update", &adamw_update, a("params"), a("m"), a("v"), a("grads"), o("decay_mask"),
          py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
          py::arg("grad_scale"), py::arg("t"));
    m.def("sum_squares", &sum_squares, a("x"));
    m.def("round_bf16", &round_bf16, a("out"), a("inp"));
    m.def("cpu_info", &cpu_info);
    m.def("set_isa", &set_isa, py::arg("name"));
    m.def("set_bf16_path", &set_bf16_path, py::arg("name"));
    m.def("set_num_threads", &set_num_threads, py::arg("n"));
    m.def("get_num_threads", &lmlab::get_num_threads);
    // Byte-level BPE's piece table (cpp/pieces.h), for lmlab.token_shards.
    py::class_<lmlab::PieceTable>(m, "PieceTable")
        .def(py::init(&make_piece_table), py::arg("classes"))
        .def("encode", &piece_table_encode, py::arg("text"), py::arg("lengths") = py::none())
        .def("add", &piece_table_add, py::arg("pieces"), py::arg("ids"), py::arg("counts"))
        .def("clear", &lmlab::PieceTable::clear)
        .def("__len__", &lmlab::PieceTable::size);
}
