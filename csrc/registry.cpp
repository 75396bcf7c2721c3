#include "ops.h"

// Each op adds its register_<op>(m) call here as it lands.
void register_all_ops(pybind11::module_& m) {
  register_sampling(m);
  register_decode_attention(m);
}
