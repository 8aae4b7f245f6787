// The fastllm._C module: one NB_MODULE, each layer binds itself.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_engine(nb::module_& m);
void bind_kernels(nb::module_& m);
void bind_models(nb::module_& m);

NB_MODULE(_C, m) {
  m.doc() = "fastllm native core: engine (scheduler, KV block manager, loop), kernels and models";
  bind_engine(m);
  nb::module_ ops = m.def_submodule("ops", "fastllm kernels over raw tensors (DLPack views)");
  bind_kernels(ops);
  nb::module_ models = m.def_submodule(
      "models", "model loops and executors built from the kernels (the native CPU executor)");
  bind_models(models);
}
