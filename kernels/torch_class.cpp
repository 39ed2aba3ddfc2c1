// The runtime as a TorchScript custom class, for Python: torch.ops.load_library(<libdeepcache_runtime.so>),
// then torch.classes.deepcache.Engine(directory, device_index). deepcache_compile/artifacts/native.py wraps it
// with the U-Net call interface (load_deepcache(..., runtime="native")).
#include <torch/custom_class.h>
#include <torch/library.h>

#include "engine.h"
#include "scheduler.h"

namespace deepcache {
namespace {

// An engine, or why the export was refused: a ManifestError is kept with its kind (load_error) for Python to
// raise as its own ManifestError; other errors (std::invalid_argument: ValueError) propagate.
struct EngineHolder : torch::CustomClassHolder {
  EngineHolder(const std::string& directory, int64_t device_index, std::vector<std::string> trusted_keys,
               int64_t runners) {
    try {
      engine = std::make_unique<Engine>(directory, static_cast<int>(device_index), trusted_keys,
                                        static_cast<int>(runners));
    } catch (const ManifestError& err) {
      error = err.what();
    }
  }
  Engine& get() const {
    if (!engine) throw ManifestError(error);
    return *engine;
  }
  std::unique_ptr<Engine> engine;
  std::string error;
};

// One generation of an engine, for concurrent use (NativeEngine.generation()).
struct GenerationHolder : torch::CustomClassHolder {
  explicit GenerationHolder(std::unique_ptr<Generation> state) : state(std::move(state)) {}
  std::unique_ptr<Generation> state;
};

// Bad input reaches Python as ValueError (by type, not by message).
template <typename F>
auto value_errors(F&& fn) {
  try {
    return fn();
  } catch (const std::invalid_argument& err) {
    TORCH_CHECK_VALUE(false, err.what());
  }
}

// The export format this library reads, declared once (manifest.h) and checked by the Python loader at load.
std::string format_info() {
  return nlohmann::json{{"format_version", kFormatVersion}, {"manifest", kManifest}, {"signature", kSignature},
                        {"error_kinds", {"ManifestError"}}}.dump();
}

// A C++ sampler for Python (tests compare it with diffusers' schedulers step by step). `options_json`: the
// set_timesteps arguments, {"sigmas": [...], "mu": x} (either may be absent or null).
TimestepOptions timestep_options(const std::string& options_json) {
  const auto j = nlohmann::json::parse(options_json);
  TimestepOptions o;
  if (j.contains("sigmas") && !j["sigmas"].is_null()) o.sigmas = j["sigmas"].get<std::vector<double>>();
  if (j.contains("mu") && !j["mu"].is_null()) o.mu = j["mu"].get<double>();
  return o;
}

struct SchedulerHolder : torch::CustomClassHolder {
  SchedulerHolder(const std::string& config_json, int64_t steps, const std::string& options_json)
      : scheduler(make_scheduler(parse_scheduler_config(config_json), static_cast<int>(steps),
                                 timestep_options(options_json))) {}
  std::unique_ptr<Scheduler> scheduler;
};

// pipeline_sampling for Python, as JSON: {"sigmas", "mu", "timestep_divisor"}.
std::string pipeline_sampling_json(const std::string& model_class, const std::string& model_config,
                                   const std::string& scheduler_config, std::vector<int64_t> sample, int64_t steps) {
  const auto s = pipeline_sampling(model_class, nlohmann::json::parse(model_config),
                                   parse_scheduler_config(scheduler_config), sample, static_cast<int>(steps));
  nlohmann::json out = {{"sigmas", s.timesteps.sigmas}, {"mu", nullptr}, {"timestep_divisor", s.timestep_divisor}};
  if (s.timesteps.mu) out["mu"] = *s.timesteps.mu;
  return out.dump();
}

// The full steps of a generation of `total` steps under the schedule of a manifest (JSON text): lets the
// tests compare the native schedule with Schedule.full_steps.
std::vector<int64_t> full_steps(const std::string& manifest_json, int64_t total) {
  auto steps = schedule_from_json(nlohmann::json::parse(manifest_json)).full_steps(static_cast<int>(total));
  return {steps.begin(), steps.end()};
}

}  // namespace

TORCH_LIBRARY(deepcache, m) {
  m.class_<GenerationHolder>("Generation")
      .def("reset", [](const c10::intrusive_ptr<GenerationHolder>& self) { self->state->reset(); })
      .def("step", [](const c10::intrusive_ptr<GenerationHolder>& self) {
        return int64_t{self->state->calls / self->state->calls_per_step};
      })
      .def("history", [](const c10::intrusive_ptr<GenerationHolder>& self) { return self->state->resolve(); });
  m.class_<EngineHolder>("Engine")
      .def(torch::init<std::string, int64_t, std::vector<std::string>, int64_t>())
      .def("load_error", [](const c10::intrusive_ptr<EngineHolder>& self) {
        return std::make_tuple(std::string(self->engine ? "" : "ManifestError"), self->error);
      })
      .def("run", [](const c10::intrusive_ptr<EngineHolder>& self, std::vector<at::Tensor> inputs) {
        return value_errors([&] { return self->get().run(std::move(inputs)); });
      })
      .def("generation", [](const c10::intrusive_ptr<EngineHolder>& self) {
        return c10::make_intrusive<GenerationHolder>(self->get().generation());
      })
      .def("run_in", [](const c10::intrusive_ptr<EngineHolder>& self, const c10::intrusive_ptr<GenerationHolder>& gen,
                        std::vector<at::Tensor> inputs) {
        return value_errors([&] { return self->get().run(*gen->state, std::move(inputs)); });
      })
      .def("reset", [](const c10::intrusive_ptr<EngineHolder>& self) { self->get().reset(); })
      .def("step", [](const c10::intrusive_ptr<EngineHolder>& self) { return int64_t{self->get().step()}; })
      .def("history", [](const c10::intrusive_ptr<EngineHolder>& self) { return self->get().history(); })
      .def("manifest", [](const c10::intrusive_ptr<EngineHolder>& self) {
        return self->get().manifest().json.dump();
      });
  m.class_<SchedulerHolder>("Scheduler")
      .def(torch::init<std::string, int64_t, std::string>())
      .def("timesteps", [](const c10::intrusive_ptr<SchedulerHolder>& self) { return self->scheduler->timesteps(); })
      .def("init_noise_sigma",
           [](const c10::intrusive_ptr<SchedulerHolder>& self) { return self->scheduler->init_noise_sigma(); })
      .def("scale_model_input",
           [](const c10::intrusive_ptr<SchedulerHolder>& self, const at::Tensor& sample, int64_t index) {
             return self->scheduler->scale_model_input(sample, index);
           })
      .def("step", [](const c10::intrusive_ptr<SchedulerHolder>& self, const at::Tensor& model_output, int64_t index,
                      const at::Tensor& sample) { return self->scheduler->step(model_output, index, sample); });
  m.def("full_steps", &full_steps);
  m.def("pipeline_sampling", [](const std::string& model_class, const std::string& model_config,
                                const std::string& scheduler_config, std::vector<int64_t> sample, int64_t steps) {
    return value_errors(
        [&] { return pipeline_sampling_json(model_class, model_config, scheduler_config, sample, steps); });
  });
  m.def("format_info", &format_info);
  m.def("sha256", [](const std::string& path) { return sha256_file(path); });
}

}  // namespace deepcache
