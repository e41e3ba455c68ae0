// The check, before every optimizer step, that a parameter group's tensor table still describes
// the group (kernels/ops/param_table.py: the rule is in its docstring, GroupTable.quick_status
// calls this, GroupTable.changes says in words what changed). It compares the Python objects the
// table was made from with what the group holds now: each parameter's address (data_ptr()) and
// shape, optimizer.state's entries and each state tensor by identity, and each gradient by
// identity and address. Those are 0.1-0.2 us apiece as Python attribute reads and list
// comparisons: the whole check took 5.6 us of the MNIST MLP's 21 us SGD step (inside
// torch.optim's step wrapper) in Python on a Zen 3, and takes 2.7 us here, most of it the
// tensors' own attribute getters.
//
// Unlike the kernels it works on Python objects, through CPython's API: it runs with the GIL
// held and calls the tensors' public Python methods (no libtorch). It holds references to those
// objects, and takes part in Python's garbage collection (pybind11's custom_type_setup, as its
// documentation shows): otherwise a cycle through it (a parameter whose attribute holds the
// optimizer) would never be collected.
#include <array>

#include <pybind11/stl.h>

#include "common.h"

namespace kernels {
namespace {

// What status() returns; kernels/ops/param_table.py's CURRENT and GRADIENTS (a test compares them).
enum Status { kCurrent = 0, kGradients = 1, kOther = 2 };
const char* const kStatusNames[] = {"current", "gradients", "other"};

PyObject* interned(const char* name) {
  PyObject* s = PyUnicode_InternFromString(name);
  if (s == nullptr) throw py::error_already_set();
  return s;  // kept for the life of the process
}

// t.data_ptr() of a tensor.
int64_t data_ptr(PyObject* t) {
  static PyObject* const name = interned("data_ptr");
  const py::object address = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(t, name));
  if (!address) throw py::error_already_set();
  const int64_t value = PyLong_AsLongLong(address.ptr());
  if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

py::object attribute(PyObject* o, PyObject* name) {
  py::object value = py::reinterpret_steal<py::object>(PyObject_GetAttr(o, name));
  if (!value) throw py::error_already_set();
  return value;
}

class TableGuard {
 public:
  // The rows' parameters with the addresses and shapes they had and the gradients (and their
  // addresses) the rows hold; optimizer.state; each state tensor in the table with its state
  // dict and key; the group's parameters without a row (they had no gradient).
  TableGuard(const py::list& params, const std::vector<int64_t>& addresses, const py::list& shapes,
             const py::list& grads, const std::vector<int64_t>& grad_addresses, py::object states,
             const py::list& state_dicts, const py::list& state_names, const py::list& state_tensors,
             const py::list& rowless)
      : params_(objects(params)),
        shapes_(objects(shapes)),
        state_dicts_(objects(state_dicts)),
        state_names_(objects(state_names)),
        state_tensors_(objects(state_tensors)),
        rowless_(objects(rowless)),
        addresses_(addresses),
        states_(std::move(states)) {
    if (addresses_.size() != params_.size() || shapes_.size() != params_.size() ||
        state_names_.size() != state_dicts_.size() || state_tensors_.size() != state_dicts_.size())
      throw std::invalid_argument("TableGuard: lists of different lengths");
    set_gradients(grads, grad_addresses);
    remember_states();
  }

  // kCurrent: the table describes the group. kGradients: everything is as it was but some
  // gradients are other tensors or at other addresses (none is None). kOther: anything else.
  // Only the code: the caller reads the new gradients again on the rare kGradients path (0.4 us
  // for six), rather than every current step paying for a tuple and a list (0.3 us).
  int status() const {
    if (cleared_) return kOther;
    static PyObject* const shape = interned("shape");
    static PyObject* const grad = interned("grad");
    for (size_t i = 0; i < params_.size(); ++i) {
      PyObject* p = params_[i].ptr();
      if (data_ptr(p) != addresses_[i]) return kOther;
      const int same_shape = PyObject_RichCompareBool(attribute(p, shape).ptr(), shapes_[i].ptr(), Py_EQ);
      if (same_shape < 0) throw py::error_already_set();
      if (!same_shape) return kOther;
    }
    // optimizer.state holds the same parameters' same state dicts, in the same order.
    PyObject* states = states_.ptr();
    if (!PyDict_Check(states) || size_t(PyDict_Size(states)) != keys_.size()) return kOther;
    Py_ssize_t position = 0;
    PyObject *key, *value;
    for (size_t j = 0; PyDict_Next(states, &position, &key, &value); ++j)
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
    bool changed = false;
    for (size_t i = 0; i < params_.size(); ++i) {
      const py::object g = attribute(params_[i].ptr(), grad);
      if (g.is_none()) return kOther;
      changed = changed || g.ptr() != grads_[i].ptr() || data_ptr(g.ptr()) != grad_addresses_[i];
    }
    return changed ? kGradients : kCurrent;
  }

  // The rows now hold these gradients, at these addresses.
  void set_gradients(const py::list& grads, const std::vector<int64_t>& addresses) {
    if (size_t(py::len(grads)) != params_.size() || addresses.size() != params_.size())
      throw std::invalid_argument("TableGuard.set_gradients: one gradient and address per row");
    grads_ = objects(grads);
    grad_addresses_ = addresses;
  }

  // Python's garbage collector: visit every object held; drop them all (status() then says kOther).
  int traverse(visitproc visit, void* arg) {
    for (std::vector<py::object>* list : held())
      for (const py::object& o : *list) Py_VISIT(o.ptr());
    Py_VISIT(states_.ptr());
    return 0;
  }
  void clear() {
    cleared_ = true;
    for (std::vector<py::object>* list : held()) list->clear();
    states_ = py::none();
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
  // Every list of objects the guard holds (besides states_).
  std::array<std::vector<py::object>*, 9> held() {
    return {&params_, &shapes_, &state_dicts_, &state_names_, &state_tensors_, &rowless_, &grads_, &keys_, &values_};
  }

  static std::vector<py::object> objects(const py::list& list) {
    std::vector<py::object> out;
    out.reserve(list.size());
    for (const py::handle& item : list) out.push_back(py::reinterpret_borrow<py::object>(item));
    return out;
  }

  std::vector<py::object> params_, shapes_, state_dicts_, state_names_, state_tensors_, rowless_, grads_;
  std::vector<int64_t> addresses_, grad_addresses_;
  py::object states_;
  std::vector<py::object> keys_, values_;
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
      .def(py::init<const py::list&, const std::vector<int64_t>&, const py::list&, const py::list&,
                    const std::vector<int64_t>&, py::object, const py::list&, const py::list&, const py::list&,
                    const py::list&>(),
           py::arg("params"), py::arg("addresses"), py::arg("shapes"), py::arg("grads"), py::arg("grad_addresses"),
           py::arg("states"), py::arg("state_dicts"), py::arg("state_names"), py::arg("state_tensors"),
           py::arg("rowless"))
      .def("status", &TableGuard::status)
      .def("set_gradients", &TableGuard::set_gradients, py::arg("grads"), py::arg("addresses"))
      .def("remember_states", &TableGuard::remember_states);
});

}  // namespace
}  // namespace kernels
