// pybind11 module ctrlsafe._C: each op's .cpp file defines a register_<op>(module) function
// declared in ops.h; this file only calls them.
#include <omp.h>
#include <pybind11/pybind11.h>

#include "ops.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "ctrlsafe CPU kernels (C++, OpenMP). Tensors are passed as data pointers + shapes.";
  m.def("num_threads", []() { return omp_get_max_threads(); },
        "OpenMP threads the kernels will use (OMP_NUM_THREADS).");
  register_all_ops(m);
}
