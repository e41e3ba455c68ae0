// The check, before every optimizer step, that a parameter group's tensor table still describes
// the group (kernels/ops/param_table.py: the rule is in its docstring, FusedOptimizer._table
// calls this, GroupTable.changes says in words what changed). It compares the Python objects the
// table was made from with what the group holds now: the group dict, its params list and length,
// the truth of the group options that shape the rows, each parameter's address (data_ptr()) and
// shape, optimizer.state's entries and each state tensor by identity, and each gradient by
// identity and address. A new gradient (a zero_grad(set_to_none=True) loop) must also have its
// row's form (dtype, layout, shape, strides, device), so that only its address changes in the
// table; the guard holds the new gradients for the table to take. Those are 0.05-0.15 us apiece
// as Python attribute reads and comparisons: in Python the check took 5.6 us of the MNIST MLP's
// 21 us SGD step (inside torch.optim's step wrapper) on a Zen 3; here it takes 3.1 us, and 6.4
// with six new gradients to check, most of it the tensors' own attribute getters.
//
// Where a group's step is one C++ launch over a host table (set_launch), launch() also puts new
// gradients' addresses in the table and runs the step (read_arguments, run_update: the same
// update csrc/mlp.cpp runs after its backward), so that a CPU step is one call from Python.
//
// Unlike the kernels it works on Python objects, through CPython's API: it runs with the GIL
// held and calls the tensors' public Python methods (no libtorch). It holds references to those
// objects, and takes part in Python's garbage collection (pybind11's custom_type_setup, as its
// documentation shows): otherwise a cycle through it (a parameter whose attribute holds the
// optimizer) would never be collected.
#include <array>

#include <pybind11/stl.h>

#include "common.h"
#include "entry_points.h"
#include "param_table.h"

namespace kernels {
namespace {

// The number of scalars and of flags each op's step takes after its table (csrc/entry_points.h).
std::pair<size_t, size_t> argument_counts(const std::string& op) {
  if (op == "adam") return {5, 3};
  if (op == "sgd") return {4, 2};
  throw std::invalid_argument("unknown optimizer update " + op);
}

}  // namespace

void read_arguments(Update& u, py::handle arguments) {
  const auto [scalars, flags] = argument_counts(u.op);
  PyObject* args = arguments.ptr();
  if (!PyTuple_Check(args) || size_t(PyTuple_GET_SIZE(args)) != scalars + flags)
    throw std::invalid_argument("the " + u.op + " update takes a tuple of " + std::to_string(scalars) +
                                " scalars and " + std::to_string(flags) + " flags");
  u.scalars.resize(scalars);
  u.flags.resize(flags);
  for (size_t i = 0; i < scalars; ++i) {
    u.scalars[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(args, i));
    if (u.scalars[i] == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  }
  for (size_t i = 0; i < flags; ++i) {
    const int truth = PyObject_IsTrue(PyTuple_GET_ITEM(args, scalars + i));
    if (truth < 0) throw py::error_already_set();
    u.flags[i] = truth == 1;
  }
}

void run_update(const std::string& dtype, const Update& u, int num_threads) {
  const auto& s = u.scalars;
  const auto& f = u.flags;
  if (u.op == "adam")
    adam_step(dtype, u.table, u.rows, s[0], s[1], s[2], s[3], s[4], f[0], f[1], f[2], num_threads);
  else if (u.op == "sgd")
    sgd_step(dtype, u.table, u.rows, s[0], s[1], s[2], s[3], f[0], f[1], num_threads);
}

namespace {

// What status() returns; kernels/ops/param_table.py's CURRENT and GRADIENTS (a test compares them).
enum Status { kCurrent = 0, kGradients = 1, kOther = 2 };
const char* const kStatusNames[] = {"current", "gradients", "other"};

PyObject* interned(const char* name) {
  PyObject* s = PyUnicode_InternFromString(name);
  if (s == nullptr) throw py::error_already_set();
  return s;  // kept for the life of the process
}

py::object attribute(PyObject* o, PyObject* name) {
  py::object value = py::reinterpret_steal<py::object>(PyObject_GetAttr(o, name));
  if (!value) throw py::error_already_set();
  return value;
}

// o.name()
py::object call(PyObject* o, PyObject* name) {
  py::object value = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(o, name));
  if (!value) throw py::error_already_set();
  return value;
}

// value == expected, in Python's terms
bool equal(const py::object& value, PyObject* expected) {
  const int same = PyObject_RichCompareBool(value.ptr(), expected, Py_EQ);
  if (same < 0) throw py::error_already_set();
  return same == 1;
}

// t.data_ptr() of a tensor.
int64_t data_ptr(PyObject* t) {
  static PyObject* const name = interned("data_ptr");
  const int64_t value = PyLong_AsLongLong(call(t, name).ptr());
  if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

class TableGuard {
 public:
  // The parameter group (a dict) with the keys of its options that shape the rows and their truth;
  // the rows' parameters with the addresses and shapes they had, the gradients (and their
  // addresses) the rows hold and the form a new gradient must have to take a row's place
  // (has_form; None: it never may); optimizer.state; each state tensor in the table with its
  // state dict and key; the group's parameters without a row (they had no gradient).
  TableGuard(py::dict group, const py::list& option_keys, const std::vector<bool>& options, const py::list& params,
             const std::vector<int64_t>& addresses, const py::list& shapes, const py::list& grads,
             const std::vector<int64_t>& grad_addresses, const py::list& forms, py::object states,
             const py::list& state_dicts, const py::list& state_names, const py::list& state_tensors,
             const py::list& rowless)
      : group_(std::move(group)),
        group_params_(group_.cast<py::dict>()["params"]),
        num_group_params_(py::len(group_params_)),
        option_keys_(objects(option_keys)),
        options_(options),
        params_(objects(params)),
        shapes_(objects(shapes)),
        state_dicts_(objects(state_dicts)),
        state_names_(objects(state_names)),
        state_tensors_(objects(state_tensors)),
        rowless_(objects(rowless)),
        addresses_(addresses),
        states_(std::move(states)) {
    if (options_.size() != option_keys_.size() || addresses_.size() != params_.size() ||
        shapes_.size() != params_.size() || state_names_.size() != state_dicts_.size() ||
        state_tensors_.size() != state_dicts_.size())
      throw std::invalid_argument("TableGuard: lists of different lengths");
    set_gradients(grads, grad_addresses, forms);
    remember_states();
  }

  // For `group` (a dict) of an optimizer whose state is `states`: kCurrent, the table describes
  // the group. kGradients: everything is as it was but some gradients are other tensors or at
  // other addresses, each of its row's form (the gradients are then held for
  // accept_gradients()). kOther: anything else. Only the code: a current step does not pay for
  // a tuple and a list (0.3 us).
  int status(const py::handle& group, const py::handle& states) {
    drop_pending();
    if (cleared_ || group.ptr() != group_.ptr() || states.ptr() != states_.ptr()) return kOther;
    static PyObject* const params_key = interned("params");
    static PyObject* const shape = interned("shape");
    static PyObject* const grad = interned("grad");
    PyObject* group_params = PyDict_GetItemWithError(group_.ptr(), params_key);  // borrowed
    if (group_params == nullptr && PyErr_Occurred()) throw py::error_already_set();
    if (group_params != group_params_.ptr()) return kOther;
    const Py_ssize_t num_group_params = PyObject_Size(group_params);
    if (num_group_params < 0) throw py::error_already_set();
    if (size_t(num_group_params) != num_group_params_) return kOther;
    for (size_t k = 0; k < option_keys_.size(); ++k) {
      PyObject* value = PyDict_GetItemWithError(group_.ptr(), option_keys_[k].ptr());  // borrowed
      if (value == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        return kOther;
      }
      const int truth = PyObject_IsTrue(value);
      if (truth < 0) throw py::error_already_set();
      if (bool(truth) != options_[k]) return kOther;
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      PyObject* p = params_[i].ptr();
      if (data_ptr(p) != addresses_[i]) return kOther;
      if (!equal(attribute(p, shape), shapes_[i].ptr())) return kOther;
    }
    // optimizer.state holds the same parameters' same state dicts, in the same order.
    if (!PyDict_Check(states.ptr()) || size_t(PyDict_Size(states.ptr())) != keys_.size()) return kOther;
    Py_ssize_t position = 0;
    PyObject *key, *value;
    for (size_t j = 0; PyDict_Next(states.ptr(), &position, &key, &value); ++j)
      if (key != keys_[j].ptr() || value != values_[j].ptr()) return kOther;
    for (size_t j = 0; j < state_tensors_.size(); ++j) {
      PyObject* dict = state_dicts_[j].ptr();
      if (!PyDict_Check(dict)) return kOther;
      PyObject* tensor = PyDict_GetItemWithError(dict, state_names_[j].ptr());  // borrowed
      if (tensor == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (tensor != state_tensors_[j].ptr()) return kOther;
    }
    for (const py::object& p : rowless_)
      if (!attribute(p.ptr(), grad).is_none()) return kOther;
    // The gradients: each row's the object it holds, at the address it holds (kCurrent); or some
    // new ones (another object, or another address), each of its row's form (kGradients).
    bool changed = false;
    for (size_t i = 0; i < params_.size(); ++i) {
      py::object g = attribute(params_[i].ptr(), grad);
      if (g.is_none()) return kOther;
      // a new object's form first: a sparse tensor has no data_ptr()
      const bool same_object = g.ptr() == grads_[i].ptr();
      if (!same_object && !has_form(g.ptr(), forms_[i].ptr())) return kOther;
      const int64_t address = data_ptr(g.ptr());
      const bool moved = same_object && address != grad_addresses_[i];
      if (moved && !has_form(g.ptr(), forms_[i].ptr())) return kOther;
      changed = changed || !same_object || moved;
      pending_grads_.push_back(std::move(g));
      pending_addresses_.push_back(address);
    }
    if (!changed) drop_pending();
    return changed ? kGradients : kCurrent;
  }

  // After status() said kGradients: gradients(), made of the new gradients status() found, which
  // the rows hold from now on.
  py::tuple accept_gradients() {
    if (pending_grads_.size() != params_.size())
      throw std::logic_error("TableGuard.accept_gradients: status() found no new gradients to accept");
    take_pending();
    return gradients();
  }

  // How many times launch() put new gradients in the rows.
  int64_t gradient_swaps() const { return gradient_swaps_; }

  // (gradients, addresses) the rows hold, a list each.
  py::tuple gradients() const {
    py::list grads(grads_.size()), addresses(grads_.size());
    for (size_t i = 0; i < grads_.size(); ++i) {
      grads[i] = grads_[i];
      addresses[i] = py::int_(grad_addresses_[i]);
    }
    return py::make_tuple(grads, addresses);
  }

  // The rows now hold these gradients, at these addresses; `forms` as in the constructor.
  void set_gradients(const py::list& grads, const std::vector<int64_t>& addresses, const py::list& forms) {
    if (size_t(py::len(grads)) != params_.size() || addresses.size() != params_.size() ||
        size_t(py::len(forms)) != params_.size())
      throw std::invalid_argument("TableGuard.set_gradients: one gradient, address and form per row");
    grads_ = objects(grads);
    grad_addresses_ = addresses;
    forms_ = objects(forms);
    drop_pending();
  }

  // The step that launch() runs: op's ("adam" or "sgd"; "" for none) over the table at `table`, in
  // host memory, of one row per row of the guard, `width` int64 fields each, the gradient's
  // address in field `grad_field`, of parameters of `dtype`, on num_threads() threads (a Python
  // callable: torch.get_num_threads).
  void set_launch(const std::string& op, const std::string& dtype, uintptr_t table, int64_t rows, int64_t grad_field,
                  int64_t width, py::object num_threads) {
    if (!op.empty()) {  // a bad step fails here, not at a step
      argument_counts(op);
      if (size_t(rows) != params_.size() || grad_field < 0 || grad_field >= width)
        throw std::invalid_argument("TableGuard.set_launch: a table of " + std::to_string(rows) + " rows of " +
                                    std::to_string(width) + " fields, the gradient in field " +
                                    std::to_string(grad_field) + ", for a guard of " +
                                    std::to_string(params_.size()) + " rows");
    }
    launch_ = Update{op, table, rows, {}, {}};
    launch_dtype_ = dtype;
    grad_field_ = grad_field;
    width_ = width;
    num_threads_ = std::move(num_threads);
  }

  // status(group, states); where that finds new gradients, they take the rows' places, their
  // addresses written into the table (as accept_gradients() and the table's set_gradients); and
  // where the table is then current, the step set_launch() set, with the op's `arguments`
  // (read_arguments), the GIL released. Returns kCurrent where it stepped, else status()'s code: a
  // CPU table checked, given new gradients and stepped in one call from Python (made apart from
  // Python, the check and the launch took 2 us more in a 17 us step, new gradients 3 us more).
  int launch(const py::handle& group, const py::handle& states, const py::handle& arguments) {
    if (launch_.op.empty()) throw std::logic_error("TableGuard.launch: no step was set (set_launch)");
    const int found = status(group, states);
    if (found == kOther) return found;
    // what can raise first: an error leaves the rows as they were
    read_arguments(launch_, arguments);
    const int threads = num_threads_().cast<int>();
    if (found == kGradients) {
      take_pending();
      ++gradient_swaps_;
      int64_t* rows = ptr<int64_t>(launch_.table);
      for (size_t r = 0; r < grad_addresses_.size(); ++r) rows[r * width_ + grad_field_] = grad_addresses_[r];
    }
    const py::gil_scoped_release release;
    run_update(launch_dtype_, launch_, threads);
    return kCurrent;
  }

  // Python's garbage collector: visit every object held; drop them all (status() then says kOther).
  int traverse(visitproc visit, void* arg) {
    for (std::vector<py::object>* list : held())
      for (const py::object& o : *list) Py_VISIT(o.ptr());
    Py_VISIT(group_.ptr());
    Py_VISIT(group_params_.ptr());
    Py_VISIT(states_.ptr());
    Py_VISIT(num_threads_.ptr());
    return 0;
  }
  void clear() {
    cleared_ = true;
    for (std::vector<py::object>* list : held()) list->clear();
    group_ = py::none();
    group_params_ = py::none();
    states_ = py::none();
    num_threads_ = py::none();
    launch_.op.clear();
  }

  // optimizer.state's entries as they are now (states of other groups' parameters came or went).
  void remember_states() {
    keys_.clear();
    values_.clear();
    if (!PyDict_Check(states_.ptr())) return;  // status() then always says kOther
    Py_ssize_t position = 0;
    PyObject *key, *value;
    while (PyDict_Next(states_.ptr(), &position, &key, &value)) {
      keys_.push_back(py::reinterpret_borrow<py::object>(key));
      values_.push_back(py::reinterpret_borrow<py::object>(value));
    }
  }

 private:
  // Every list of objects the guard holds (besides group_, group_params_ and states_).
  std::array<std::vector<py::object>*, 12> held() {
    return {&option_keys_, &params_, &shapes_, &state_dicts_, &state_names_, &state_tensors_,
            &rowless_,     &grads_,  &forms_,  &pending_grads_, &keys_,      &values_};
  }

  void drop_pending() {
    pending_grads_.clear();
    pending_addresses_.clear();
  }

  // The rows hold the gradients status() found.
  void take_pending() {
    grads_.swap(pending_grads_);
    grad_addresses_.swap(pending_addresses_);
    drop_pending();
  }

  // Whether tensor t has the form (dtype, layout, shape, strides, device index) `form` (the
  // tuple kernels/ops/param_table.py's grad_form makes), or False where the form is None.
  static bool has_form(PyObject* t, PyObject* form) {
    static PyObject* const dtype = interned("dtype");
    static PyObject* const layout = interned("layout");
    static PyObject* const shape = interned("shape");
    static PyObject* const stride = interned("stride");
    static PyObject* const get_device = interned("get_device");
    if (form == Py_None) return false;
    if (!PyTuple_Check(form) || PyTuple_GET_SIZE(form) != 5)
      throw std::invalid_argument("TableGuard: a gradient form is a tuple of 5 or None");
    // the layout before the strides: a sparse tensor has none
    return equal(attribute(t, dtype), PyTuple_GET_ITEM(form, 0)) &&
           equal(attribute(t, layout), PyTuple_GET_ITEM(form, 1)) &&
           equal(attribute(t, shape), PyTuple_GET_ITEM(form, 2)) &&
           equal(call(t, stride), PyTuple_GET_ITEM(form, 3)) &&
           equal(call(t, get_device), PyTuple_GET_ITEM(form, 4));
  }

  static std::vector<py::object> objects(const py::list& list) {
    std::vector<py::object> out;
    out.reserve(list.size());
    for (const py::handle& item : list) out.push_back(py::reinterpret_borrow<py::object>(item));
    return out;
  }

  py::object group_;  // a dict
  py::object group_params_;
  size_t num_group_params_;
  std::vector<py::object> option_keys_;
  std::vector<bool> options_;
  std::vector<py::object> params_, shapes_, state_dicts_, state_names_, state_tensors_, rowless_, grads_;
  std::vector<int64_t> addresses_, grad_addresses_;
  std::vector<py::object> forms_;  // per row: the form a new gradient must have (has_form), or None
  std::vector<py::object> pending_grads_;  // what status() last found on its way to kGradients
  std::vector<int64_t> pending_addresses_;
  py::object states_;
  std::vector<py::object> keys_, values_;
  Update launch_;  // what launch() runs (set_launch); op "": nothing
  std::string launch_dtype_;
  int64_t grad_field_ = 0, width_ = 0;
  int64_t gradient_swaps_ = 0;  // how many times launch() put new gradients in the rows
  py::object num_threads_;
  bool cleared_ = false;
};

// Whether the C++ object of a Python TableGuard exists (its __init__ has run).
bool constructed(PyObject* self) {
#if PYBIND11_VERSION_MAJOR >= 3
  return py::detail::is_holder_constructed(self);
#else
  (void)self;
  return true;  // pybind11 2.x has no such test; its custom_type_setup example assumes this
#endif
}

// The garbage collector's hooks on the Python type (pybind11's documented custom_type_setup
// pattern).
void collectable(PyHeapTypeObject* heap_type) {
  PyTypeObject* type = &heap_type->ht_type;
  type->tp_flags |= Py_TPFLAGS_HAVE_GC;
  type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
    Py_VISIT(Py_TYPE(self));
    if (!constructed(self)) return 0;
    return py::cast<TableGuard&>(py::handle(self)).traverse(visit, arg);
  };
  type->tp_clear = [](PyObject* self) -> int {
    if (constructed(self)) py::cast<TableGuard&>(py::handle(self)).clear();
    return 0;
  };
}

static const Register registration([](py::module_& m) {
  py::dict codes;
  for (int s = kCurrent; s <= kOther; ++s) codes[kStatusNames[s]] = s;
  m.attr("table_status_codes") = codes;
  py::class_<TableGuard>(m, "TableGuard",
                         "The per-step check that an optimizer's tensor table still describes its parameter "
                         "group (see csrc/param_table.cpp)",
                         py::custom_type_setup(collectable))
      .def(py::init<py::dict, const py::list&, const std::vector<bool>&, const py::list&, const std::vector<int64_t>&,
                    const py::list&, const py::list&, const std::vector<int64_t>&, const py::list&, py::object,
                    const py::list&, const py::list&, const py::list&, const py::list&>(),
           py::arg("group"), py::arg("option_keys"), py::arg("options"), py::arg("params"), py::arg("addresses"),
           py::arg("shapes"), py::arg("grads"), py::arg("grad_addresses"), py::arg("forms"),
           py::arg("states"), py::arg("state_dicts"), py::arg("state_names"), py::arg("state_tensors"),
           py::arg("rowless"))
      .def("status", &TableGuard::status, py::arg("group"), py::arg("states"))
      .def("set_gradients", &TableGuard::set_gradients, py::arg("grads"), py::arg("addresses"), py::arg("forms"))
      .def("accept_gradients", &TableGuard::accept_gradients)
      .def("gradients", &TableGuard::gradients)
      .def_property_readonly("gradient_swaps", &TableGuard::gradient_swaps)
      .def("remember_states", &TableGuard::remember_states)
      .def("set_launch", &TableGuard::set_launch, py::arg("op"), py::arg("dtype"), py::arg("table"), py::arg("rows"),
           py::arg("grad_field"), py::arg("width"), py::arg("num_threads"))
      .def("launch", &TableGuard::launch, py::arg("group"), py::arg("states"), py::arg("arguments"));
});

}  // namespace
}  // namespace kernels
