// deepcache-generate: a complete generation in C++ with an exported DeepCache engine.
//
//   deepcache-generate ENGINE_DIR INPUTS.safetensors OUT.safetensors --steps N [--guidance G] [--threads T]
//                      [--scheduler scheduler_config.json] [--trusted-key signing.pub.pem ...]
//
// ENGINE_DIR is an `aoti` export with the scheduler's config beside the engines (dc.export(...,
// scheduler=pipe.scheduler) writes `scheduler_config.json` and lists it in the manifest); --scheduler runs
// another sampler's config instead (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler or
// FlowMatchEulerDiscreteScheduler, see scheduler.h: the graphs do not depend on it), set as the model's diffusers
// pipeline sets it (scheduler.h's pipeline_sampling: FluxPipeline's sigmas, mu and timestep / 1000 for a Flux
// export). INPUTS holds `sample` (the initial noise, passed as the model's first input: a U-Net's `sample`, a
// transformer's `hidden_states`, Flux's packed latents; scaled here by the scheduler's init_noise_sigma as
// diffusers' pipelines do) and the model's other inputs by their manifest names (Flux: txt_ids, img_ids,
// guidance, ... as its pipeline makes them); with --guidance > 1 (classifier-free guidance) the batched
// conditioning inputs hold the unconditional rows first, then the conditional ones, and the model runs once per
// step on the doubled batch. OUT receives `sample`, the final latents. With --trusted-key (repeatable) the export
// must be signed by one of those Ed25519 keys (export(..., sign_key=)), checked before anything is loaded. Every
// input is checked against the manifest (names, ranks, batch, the export's shape ranges) before the first step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "engine.h"
#include "safetensors.h"
#include "scheduler.h"

namespace {

const char* kUsage =
    "usage: deepcache-generate ENGINE_DIR INPUTS.safetensors OUT.safetensors --steps N [--guidance G] "
    "[--threads T] [--scheduler CONFIG.json] [--trusted-key PUBLIC.pem]...";

struct Options {
  int steps = 0;
  double guidance = 1.0;
  int threads = 0;
  std::string scheduler;
  std::vector<std::string> trusted_keys;
};

template <typename T>
T parse_number(const std::string& flag, const std::string& text) {
  size_t used = 0;
  T value{};
  try {
    if constexpr (std::is_same_v<T, int>) value = std::stoi(text, &used);
    else value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty())
    throw std::invalid_argument(flag + " " + text + " is not a number");
  return value;
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 4; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag != "--steps" && flag != "--guidance" && flag != "--threads" && flag != "--scheduler" &&
        flag != "--trusted-key")
      throw std::invalid_argument("unknown flag " + flag + "\n" + kUsage);
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value\n" + kUsage);
    const std::string value = argv[i + 1];
    if (flag == "--steps") o.steps = parse_number<int>(flag, value);
    else if (flag == "--guidance") o.guidance = parse_number<double>(flag, value);
    else if (flag == "--threads") o.threads = parse_number<int>(flag, value);
    else if (flag == "--scheduler") o.scheduler = value;
    else o.trusted_keys.push_back(value);
  }
  if (o.steps < 1) throw std::invalid_argument("--steps N (1 or more) is required\n" + std::string(kUsage));
  if (o.threads < 0) throw std::invalid_argument("--threads must be 0 (all cores) or more");
  return o;
}

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument(path.string() + " cannot be read");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Every manifest input besides `sample` and `timestep` must be in INPUTS with the manifest's rank and, if it is
// batched, the call's batch (twice the sample's with guidance); names not in the manifest are refused, as the
// Python engine does.
void check_inputs(const deepcache::Manifest& manifest, const std::map<std::string, at::Tensor>& inputs,
                  const std::string& file, bool cfg) {
  auto names = [&] {
    std::string out;
    for (const auto& [name, _] : inputs) out += (out.empty() ? "" : ", ") + name;
    return out.empty() ? std::string("no tensors") : out;
  };
  if (!inputs.count("sample"))
    throw std::invalid_argument(file + " has no tensor named sample (the initial noise); it holds " + names());
  const auto& sample = inputs.at("sample");
  const int64_t batch = sample.size(0) * (cfg ? 2 : 1);
  manifest.ranges.check(std::vector<int64_t>{batch, sample.size(-2), sample.size(-1)});
  std::set<std::string> known = {"sample"};
  for (const auto& spec : manifest.inputs) {
    known.insert(spec.name);
    const bool is_sample = &spec == &manifest.inputs.front();
    if (is_sample || spec.name == "timestep") {
      if (is_sample && sample.dim() != spec.rank)
        throw std::invalid_argument(file + ": sample has " + std::to_string(sample.dim()) + " dimensions, the export " +
                                    "takes " + std::to_string(spec.rank));
      continue;
    }
    if (!inputs.count(spec.name))
      throw std::invalid_argument(file + " lacks the input " + spec.name + " (it holds " + names() + ")");
    const auto& t = inputs.at(spec.name);
    if (t.dim() != spec.rank)
      throw std::invalid_argument(file + ": " + spec.name + " has " + std::to_string(t.dim()) + " dimensions, the " +
                                  "export takes " + std::to_string(spec.rank));
    if (spec.batched && t.size(0) != batch)
      throw std::invalid_argument(file + ": " + spec.name + " has " + std::to_string(t.size(0)) + " rows, the call " +
                                  "has " + std::to_string(batch) + (cfg ? " (the sample's, twice for --guidance)" : ""));
  }
  for (const auto& [name, _] : inputs)
    if (!known.count(name))
      throw std::invalid_argument(file + " holds " + name + ", which is not an input of this export");
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 4) {
    std::cerr << kUsage << "\n";
    return 2;
  }
  const auto options = parse_options(argc, argv);
  if (options.threads > 0) at::set_num_threads(options.threads);
  deepcache::Engine engine(argv[1], -1, options.trusted_keys);
  const auto& manifest = engine.manifest();
  std::filesystem::path config_path = options.scheduler;
  if (config_path.empty()) {
    if (!manifest.json.contains("scheduler") || manifest.json["scheduler"].is_null())
      throw std::invalid_argument(std::string(argv[1]) + " has no scheduler config: export with "
                                  "dc.export(..., scheduler=pipe.scheduler), or pass --scheduler");
    config_path = manifest.directory / manifest.json["scheduler"].get<std::string>();
  }
  const auto config = deepcache::parse_scheduler_config(read_text(config_path));

  const auto inputs = deepcache::load_safetensors(argv[2]);
  const bool cfg = options.guidance > 1.0;
  check_inputs(manifest, inputs, argv[2], cfg);
  // The sampler as the model's diffusers pipeline sets it (Flux: its sigmas, mu and timestep / 1000).
  const auto& model = manifest.json.at("unet");
  const auto sampling =
      deepcache::pipeline_sampling(model.value("class", std::string()), model.value("config", nlohmann::json::object()),
                                   config, inputs.at("sample").sizes().vec(), options.steps);
  auto scheduler = deepcache::make_scheduler(config, options.steps, sampling.timesteps);
  at::Tensor latents = inputs.at("sample") * scheduler->init_noise_sigma();
  for (int64_t i = 0; i < scheduler->size(); ++i) {
    const auto model_input = scheduler->scale_model_input(cfg ? at::cat({latents, latents}) : latents, i);
    std::vector<at::Tensor> call;
    for (const auto& spec : manifest.inputs) {
      if (&spec == &manifest.inputs.front()) call.push_back(model_input);  // the sample (U-Net) or hidden_states
      else if (spec.name == "timestep")
        call.push_back(sampling.timestep_divisor == 1 ? scheduler->timestep(i)
                                                      : scheduler->timestep(i) / sampling.timestep_divisor);
      else call.push_back(inputs.at(spec.name));
    }
    at::Tensor noise = engine.run(std::move(call));
    if (noise.size(1) == 2 * latents.size(1))  // a learned-variance model (DiT, PixArt): its noise half, as
      noise = noise.chunk(2, 1)[0];             // diffusers' pipelines take it
    if (cfg) {
      auto halves = noise.chunk(2);
      noise = halves[0] + options.guidance * (halves[1] - halves[0]);
    }
    latents = scheduler->step(noise, i, latents);
  }
  deepcache::save_safetensors(argv[3], {{"sample", latents}});
  std::cout << "history " << engine.history() << "\n";
  return 0;
} catch (const std::exception& err) {
  std::cerr << "deepcache-generate: " << err.what() << "\n";
  return 1;
}
