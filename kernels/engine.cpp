#include "engine.h"

#include "kernels.h"

#include <ATen/ATen.h>

#include <sstream>
#include <stdexcept>

namespace deepcache {

Engine::Engine(const std::filesystem::path& directory, int device_index, const std::vector<std::string>& trusted_keys,
               int runners)
    : manifest_(read_manifest(directory, trusted_keys)), state_(manifest_.calls_per_step) {
  if (runners < 1) throw std::invalid_argument("runners=" + std::to_string(runners) + ": 1 or more");
  using torch::inductor::AOTIModelPackageLoader;
  for (const auto& op : manifest_.native_ops) {
    const auto missing = native_op_missing(op);
    if (!missing.empty())
      throw ManifestError(directory.string() + ": the engines call " + op + ", which cannot run here: " +
                               missing + "; export again with options={'attention': 'sdpa'} for machines without it");
  }
  // The packages this export runs: full and shallow, or head, deep and tail for adaptive refresh. What each
  // accepts comes from the package: the manifest's ranges must be the ones compiled in.
  auto load = [&](const std::string& part) {
    auto loader = std::make_unique<AOTIModelPackageLoader>(manifest_.file(part).string(), "model", false, runners,
                                                           device_index);
    const auto metadata = loader->get_metadata();
    const auto found = metadata.find(kRangesKey);
    check_compiled_ranges(manifest_, manifest_.file(part), found == metadata.end() ? "" : found->second);
    return loader;
  };
  if (manifest_.step) {
    step_ = load("step");
  } else if (manifest_.policy) {
    head_ = load("head");
    deep_ = load("deep");
    tail_ = load("tail");
  } else {
    full_ = load("full");
    shallow_ = load("shallow");
  }
  for (size_t i = 0; i < manifest_.inputs.size(); ++i)
    if (manifest_.inputs[i].name == "timestep") timestep_index_ = static_cast<int>(i);
}

// Brings each input to the exported dtype and rank (a 1-d timestep to 0-d, a 0-d one to the batch), checks
// the count once per call and the ranges once per signature; returns the signature.
std::string Engine::check_inputs(std::vector<at::Tensor>& inputs) {
  const auto& specs = manifest_.inputs;
  if (inputs.size() != specs.size()) {
    std::string names;
    for (const auto& s : specs) names += (names.empty() ? "" : ", ") + s.name;
    throw std::invalid_argument("expected " + std::to_string(specs.size()) + " inputs (" + names + "), got " +
                                std::to_string(inputs.size()));
  }
  const int64_t batch = inputs[0].size(0);
  std::ostringstream signature;
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto& t = inputs[i];
    if (t.dim() != specs[i].rank) t = specs[i].rank == 0 ? t.reshape(-1)[0] : t.expand({batch});
    if (t.scalar_type() != specs[i].dtype) t = t.to(specs[i].dtype);
    signature << t.sizes() << t.scalar_type() << ';';
  }
  auto key = signature.str();
  {
    std::lock_guard<std::mutex> lock(checked_mutex_);
    if (!checked_.count(key)) {
      manifest_.ranges.check(inputs[0].sizes().vec());
      checked_.insert(key);
    }
  }
  if (batch < manifest_.pad_batch) {  // artifacts/engine.py's padding: batched inputs' rows repeated
    const auto times = (manifest_.pad_batch + batch - 1) / batch;
    for (auto& t : inputs) {
      if (t.dim() == 0 || t.size(0) != batch) continue;
      std::vector<int64_t> repeats(t.dim(), 1);
      repeats[0] = times;
      t = t.repeat(repeats).narrow(0, 0, manifest_.pad_batch);
    }
  }
  return key;
}

at::Tensor Engine::run(Generation& generation, std::vector<at::Tensor> inputs) {
  const int64_t rows = inputs.empty() ? 0 : inputs[0].size(0);
  const auto signature = check_inputs(inputs);
  if (rows < manifest_.pad_batch) return run_checked(generation, signature, std::move(inputs)).narrow(0, 0, rows);
  return run_checked(generation, signature, std::move(inputs));
}

at::Tensor Engine::run_checked(Generation& generation, const std::string& signature, std::vector<at::Tensor> inputs) {
  std::optional<double> timestep;
  if (timestep_index_ >= 0 && inputs[timestep_index_].device().is_cpu())
    timestep = inputs[timestep_index_].reshape(-1)[0].item<double>();  // host memory: no device sync
  auto [step, slot] = generation.begin(signature, timestep);
  if (manifest_.step) return run_on_device(generation, slot, std::move(inputs));
  if (manifest_.policy) return run_adaptive(generation, slot, std::move(inputs));
  const auto& schedule = manifest_.schedule;
  if (schedule.calibration) {
    const auto& shape = inputs[0].sizes();
    schedule.calibration->check(step, shape[shape.size() - 2], shape.back(), timestep);
  }
  auto& cache = generation.caches[slot];
  if (!cache || schedule.is_full(step)) {
    auto out = full_->run(inputs);
    if (manifest_.forecast) generation.extrapolations[slot].full(out.at(1), step);
    generation.end(slot, out.at(1));
    return out.at(0);
  }
  inputs.push_back(*cache);
  if (manifest_.forecast) {
    auto [slope, steps] = generation.extrapolations[slot].inputs(step);
    inputs.push_back(slope);
    inputs.push_back(steps);
  }
  auto out = shallow_->run(inputs);
  generation.end(slot, std::nullopt);
  return out.at(0);
}

// The C++ twin of refresh.AdaptiveController.decide and runtime/generation.run_step's three-graph branch.
at::Tensor Engine::run_adaptive(Generation& generation, int slot, std::vector<at::Tensor> inputs) {
  const auto& policy = *manifest_.policy;
  auto links = head_->run(inputs);
  const auto& probe = links.at(policy.probe);
  auto& previous = generation.probes[slot];
  bool full = true;
  if (previous) {  // the relative L1 change of the probe since the step before, accumulated (float32 norms)
    const auto x = probe.to(at::kFloat), reference = previous->to(at::kFloat);
    const auto change = at::linalg_vector_norm(x - reference, 1) / at::linalg_vector_norm(reference, 1).clamp_min(1e-12);
    generation.drift[slot] += change.item<float>();
    full = generation.drift[slot] >= policy.threshold || generation.shallow_run[slot] >= policy.max_skip;
  }
  previous = probe;
  if (full) {
    generation.drift[slot] = 0.0;
    generation.shallow_run[slot] = 0;
  } else {
    ++generation.shallow_run[slot];
  }
  auto& cache = generation.caches[slot];
  full = full || !cache;
  std::vector<at::Tensor> call = inputs;
  call.insert(call.end(), links.begin(), links.end());
  at::Tensor kept = full ? deep_->run(call).at(0) : *cache;
  call.push_back(kept);
  auto out = tail_->run(call);
  generation.end(slot, full ? std::optional<at::Tensor>(kept) : std::nullopt);
  return out.at(0);
}

// The C++ twin of runtime/generation.run_step's step-graph branch.
at::Tensor Engine::run_on_device(Generation& generation, int slot, std::vector<at::Tensor> inputs) {
  const auto& spec = *manifest_.step;
  auto& state = generation.device_states[slot];
  const auto options = inputs.at(0).options();
  if (state.empty()) {  // a generation's first step: zeros, and run = limit (full)
    std::vector<int64_t> cache{inputs[0].size(0)}, probe{inputs[0].size(0)};
    cache.insert(cache.end(), spec.cache.begin(), spec.cache.end());
    probe.insert(probe.end(), spec.probe.begin(), spec.probe.end());
    state = {at::zeros(cache, options.dtype(spec.cache_dtype)), at::zeros(probe, options.dtype(spec.probe_dtype)),
             at::zeros({}, options.dtype(at::kFloat)), at::full({}, spec.limit, options.dtype(at::kLong))};
  }
  inputs.insert(inputs.end(), state.begin(), state.end());
  inputs.push_back(at::zeros({}, options.dtype(at::kLong)));  // mode 0: decide
  auto out = step_->run(inputs);
  state.assign(out.begin() + 1, out.begin() + 5);
  generation.end_on_device(out.at(5));
  return out.at(0);
}

}  // namespace deepcache
