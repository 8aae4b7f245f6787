// The fastllm._C module: one NB_MODULE, each layer binds itself.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_engine(nb::module_& m);
void bind_kernels(nb::module_& m);
void bind_decoder(nb::module_& m);

NB_MODULE(_C, m) {
  m.doc() = "fastllm native core: engine (scheduler, KV block manager, loop) and kernels";
  bind_engine(m);
  nb::module_ ops = m.def_submodule("ops", "fastllm kernels over raw tensors (DLPack views)");
  bind_kernels(ops);
  bind_decoder(ops);
}
