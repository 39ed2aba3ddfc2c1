// Samplers for generation loops in C++: diffusers' DDIMScheduler (eta 0), EulerDiscreteScheduler and
// DPMSolverMultistepScheduler (DPM-Solver++, orders 1-2) and FlowMatchEulerDiscreteScheduler (SD3's; fixed
// or resolution-dependent shift), from the scheduler config an export carries.
//
// Each follows diffusers' arithmetic (float32 tensors where diffusers uses them, float64 where it uses numpy) so
// that a loop here equals the same loop in Python within float rounding; tests/test_native.py checks the
// timesteps exactly and the trajectories over the supported configurations. A config key this file does not
// implement, or a value it does not support, is refused with its name before any step runs.
//
//   auto sampler = deepcache::make_scheduler(config, /*steps=*/25);   // throws std::invalid_argument
//   auto x = noise * sampler->init_noise_sigma();
//   for (int64_t i = 0; i < sampler->size(); ++i)
//     x = sampler->step(unet(sampler->scale_model_input(x, i), sampler->timestep(i)), i, x);
#pragma once

#include <ATen/Tensor.h>
#include <nlohmann/json.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace deepcache {

class Scheduler {
 public:
  virtual ~Scheduler() = default;

  // The timesteps the denoiser sees, in diffusers' dtype (int64 for DDIM and DPM-Solver, float32 for the Eulers).
  const at::Tensor& timesteps() const { return timesteps_; }
  int64_t size() const { return timesteps_.size(0); }
  at::Tensor timestep(int64_t index) const { return timesteps_[index]; }

  // What the initial noise is multiplied by (pipelines' prepare_latents).
  virtual double init_noise_sigma() const { return 1.0; }
  // The denoiser's input at step `index` (Euler divides by sqrt(sigma^2 + 1)).
  virtual at::Tensor scale_model_input(const at::Tensor& sample, int64_t /*index*/) const { return sample; }
  // The sample after step `index`. Steps run in order 0..size()-1 (multistep solvers keep earlier outputs).
  virtual at::Tensor step(const at::Tensor& model_output, int64_t index, const at::Tensor& sample) = 0;

 protected:
  at::Tensor timesteps_;
};

// What a pipeline passes to set_timesteps besides the step count (diffusers' `sigmas=` and `mu=`); only the
// flow-matching sampler takes them.
struct TimestepOptions {
  std::vector<double> sigmas;  // one per step, before shifting (empty: the scheduler's own)
  std::optional<double> mu;    // the resolution-dependent shift (`use_dynamic_shifting`)
};

// The scheduler named by the config's `_class_name`, set for `steps` inference steps. Throws
// std::invalid_argument naming the class, key or value it does not implement.
std::unique_ptr<Scheduler> make_scheduler(const nlohmann::json& config, int steps,
                                          const TimestepOptions& options = {});

// How diffusers' pipeline for a model class drives its sampler where that differs from the plain loop: the
// set_timesteps arguments it computes (FluxPipeline: sigmas linspace(1, 1/N, N) and mu from the packed latents'
// token count; StableDiffusion3Pipeline with use_dynamic_shifting: mu from the latents' patch count) and what
// it divides the timestep by before the model sees it (FluxPipeline: 1000). `model_class`/`model_config`: the
// manifest's `unet` entry; `sample`: the initial latents' shape.
struct PipelineSampling {
  TimestepOptions timesteps;
  double timestep_divisor = 1.0;
};
PipelineSampling pipeline_sampling(const std::string& model_class, const nlohmann::json& model_config,
                                   const nlohmann::json& scheduler_config, const std::vector<int64_t>& sample,
                                   int steps);

// Parses a scheduler config as diffusers writes it: Python's json module writes infinite floats as the bare
// words Infinity and -Infinity (DPMSolverMultistepScheduler's lambda_min_clipped), which JSON does not have.
nlohmann::json parse_scheduler_config(const std::string& text);

// The class names make_scheduler implements.
std::vector<std::string> scheduler_classes();

}  // namespace deepcache
