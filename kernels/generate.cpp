// deepcache-generate: a complete DDIM (eta 0) generation in C++ with an exported DeepCache engine.
//
//   deepcache-generate ENGINE_DIR INPUTS.safetensors OUT.safetensors --steps 50 [--guidance 7.5] [--threads 2]
//
// ENGINE_DIR is an `aoti` export with the scheduler's config beside the engines (dc.export(...,
// scheduler=pipe.scheduler) writes `scheduler_config.json` and lists it in the manifest). INPUTS holds `sample`
// (the initial noise) and the other U-Net inputs by their manifest names; with --guidance > 1 (classifier-free
// guidance) those conditioning inputs hold the unconditional rows first, then the conditional ones, and the
// U-Net runs once per step on the doubled batch. OUT receives `sample`, the final latents.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "engine.h"
#include "safetensors.h"

namespace {

// DDIM with eta = 0, from a diffusers DDIMScheduler config (the same float32 arithmetic as diffusers).
class DDIM {
 public:
  DDIM(const nlohmann::json& config, int steps) : steps_(steps) {
    train_steps_ = config.value("num_train_timesteps", 1000);
    auto schedule = config.value("beta_schedule", std::string("linear"));
    double start = config.value("beta_start", 0.0001), end = config.value("beta_end", 0.02);
    at::Tensor betas;
    if (schedule == "linear")
      betas = at::linspace(start, end, train_steps_, at::kFloat);
    else if (schedule == "scaled_linear")
      betas = at::linspace(std::sqrt(start), std::sqrt(end), train_steps_, at::kFloat).pow(2);
    else
      throw std::invalid_argument("beta_schedule=" + schedule + " is not supported: use linear or scaled_linear");
    for (const char* unsupported : {"thresholding", "rescale_betas_zero_snr"})
      if (config.value(unsupported, false))
        throw std::invalid_argument(std::string(unsupported) + "=true is not supported by deepcache-generate");
    alphas_cumprod_ = at::cumprod(1 - betas, 0);
    final_alpha_cumprod_ = config.value("set_alpha_to_one", true) ? at::scalar_tensor(1.0, at::kFloat)
                                                                   : alphas_cumprod_[0];
    prediction_ = config.value("prediction_type", std::string("epsilon"));
    clip_ = config.value("clip_sample", true);
    clip_range_ = config.value("clip_sample_range", 1.0);
    timesteps_ = make_timesteps(config.value("timestep_spacing", std::string("leading")),
                                config.value("steps_offset", 0));
  }

  const std::vector<int64_t>& timesteps() const { return timesteps_; }

  at::Tensor step(const at::Tensor& model_output, int64_t t, const at::Tensor& sample) const {
    int64_t prev = t - train_steps_ / steps_;
    auto alpha_t = alphas_cumprod_[t];
    auto alpha_prev = prev >= 0 ? alphas_cumprod_[prev] : final_alpha_cumprod_;
    auto beta_t = 1 - alpha_t;
    at::Tensor x0, eps;
    if (prediction_ == "epsilon") {
      x0 = (sample - beta_t.pow(0.5) * model_output) / alpha_t.pow(0.5);
      eps = model_output;
    } else if (prediction_ == "sample") {
      x0 = model_output;
      eps = (sample - alpha_t.pow(0.5) * x0) / beta_t.pow(0.5);
    } else if (prediction_ == "v_prediction") {
      x0 = alpha_t.pow(0.5) * sample - beta_t.pow(0.5) * model_output;
      eps = alpha_t.pow(0.5) * model_output + beta_t.pow(0.5) * sample;
    } else {
      throw std::invalid_argument("prediction_type=" + prediction_ + " is not supported");
    }
    if (clip_) x0 = x0.clamp(-clip_range_, clip_range_);
    return alpha_prev.pow(0.5) * x0 + (1 - alpha_prev).pow(0.5) * eps;
  }

 private:
  std::vector<int64_t> make_timesteps(const std::string& spacing, int offset) const {
    std::vector<int64_t> out;
    if (spacing == "leading") {
      for (int i = steps_ - 1; i >= 0; --i) out.push_back(int64_t(i) * (train_steps_ / steps_) + offset);
    } else if (spacing == "trailing") {
      double ratio = double(train_steps_) / steps_;
      for (double t = train_steps_; t > 0; t -= ratio) out.push_back(std::llround(t) - 1);
    } else if (spacing == "linspace") {
      for (int i = steps_ - 1; i >= 0; --i)
        out.push_back(std::llround(double(train_steps_ - 1) * i / std::max(1, steps_ - 1)));
    } else {
      throw std::invalid_argument("timestep_spacing=" + spacing + " is not supported");
    }
    return out;
  }

  int steps_, train_steps_;
  at::Tensor alphas_cumprod_, final_alpha_cumprod_;
  std::string prediction_;
  bool clip_;
  double clip_range_;
  std::vector<int64_t> timesteps_;
};

int usage() {
  std::cerr << "usage: deepcache-generate ENGINE_DIR INPUTS.safetensors OUT.safetensors --steps N "
               "[--guidance G] [--threads T]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 4) return usage();
  int steps = 50, threads = 0;
  double guidance = 1.0;
  for (int i = 4; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--steps") steps = std::stoi(argv[i + 1]);
    else if (flag == "--guidance") guidance = std::stod(argv[i + 1]);
    else if (flag == "--threads") threads = std::stoi(argv[i + 1]);
    else return usage();
  }
  if (threads > 0) at::set_num_threads(threads);
  deepcache::Engine engine(argv[1]);
  const auto& manifest = engine.manifest();
  if (!manifest.json.contains("scheduler"))
    throw std::invalid_argument(std::string(argv[1]) + " has no scheduler config: export with "
                                "dc.export(..., scheduler=pipe.scheduler)");
  std::ifstream config_file(manifest.directory / manifest.json["scheduler"].get<std::string>());
  DDIM ddim(nlohmann::json::parse(config_file), steps);

  auto inputs = deepcache::load_safetensors(argv[2]);
  at::Tensor latents = inputs.at("sample");
  const bool cfg = guidance > 1.0;
  for (int64_t t : ddim.timesteps()) {
    std::vector<at::Tensor> call;
    for (const auto& spec : manifest.inputs) {
      if (spec.name == "sample") call.push_back(cfg ? at::cat({latents, latents}) : latents);
      else if (spec.name == "timestep") call.push_back(at::scalar_tensor(t, at::kLong));
      else if (inputs.count(spec.name)) call.push_back(inputs.at(spec.name));
      else throw std::invalid_argument(std::string(argv[2]) + " lacks the input " + spec.name);
    }
    at::Tensor noise = engine.run(std::move(call));
    if (cfg) {
      auto halves = noise.chunk(2);
      noise = halves[0] + guidance * (halves[1] - halves[0]);
    }
    latents = ddim.step(noise, t, latents);
  }
  deepcache::save_safetensors(argv[3], {{"sample", latents}});
  std::cout << "history " << engine.history() << "\n";
  return 0;
} catch (const std::exception& err) {
  std::cerr << "deepcache-generate: " << err.what() << "\n";
  return 1;
}
