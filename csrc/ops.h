// Registration hooks of the CPU kernels; each lives in its own <op>.cpp.
#pragma once
#include <pybind11/pybind11.h>

void register_all_ops(pybind11::module_& m);
void register_sampling(pybind11::module_& m);
void register_decode_attention(pybind11::module_& m);
