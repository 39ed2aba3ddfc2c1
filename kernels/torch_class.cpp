// The runtime as a TorchScript custom class, for Python: torch.ops.load_library(<libdeepcache_runtime.so>),
// then torch.classes.deepcache.Engine(directory, device_index). deepcache_compile/artifacts/native.py wraps it
// with the U-Net call interface (load_deepcache(..., runtime="native")).
#include <torch/custom_class.h>
#include <torch/library.h>

#include "engine.h"

namespace deepcache {
namespace {

struct EngineHolder : torch::CustomClassHolder {
  EngineHolder(const std::string& directory, int64_t device_index)
      : engine(directory, static_cast<int>(device_index)) {}
  Engine engine;
};

// The full steps of a generation of `total` steps under the schedule of a manifest (JSON text): lets the
// tests compare the native schedule with Schedule.full_steps.
std::vector<int64_t> full_steps(const std::string& manifest_json, int64_t total) {
  auto steps = schedule_from_json(nlohmann::json::parse(manifest_json)).full_steps(static_cast<int>(total));
  return {steps.begin(), steps.end()};
}

}  // namespace

TORCH_LIBRARY(deepcache, m) {
  m.class_<EngineHolder>("Engine")
      .def(torch::init<std::string, int64_t>())
      .def("run", [](const c10::intrusive_ptr<EngineHolder>& self, std::vector<at::Tensor> inputs) {
        return self->engine.run(std::move(inputs));
      })
      .def("reset", [](const c10::intrusive_ptr<EngineHolder>& self) { self->engine.reset(); })
      .def("step", [](const c10::intrusive_ptr<EngineHolder>& self) { return int64_t{self->engine.step()}; })
      .def("history", [](const c10::intrusive_ptr<EngineHolder>& self) { return self->engine.history(); })
      .def("manifest", [](const c10::intrusive_ptr<EngineHolder>& self) {
        return self->engine.manifest().json.dump();
      });
  m.def("full_steps", &full_steps);
  m.def("sha256", [](const std::string& path) { return sha256_file(path); });
}

}  // namespace deepcache
