#include "engine.h"

#include "kernels.h"

#include <sstream>
#include <stdexcept>

namespace deepcache {

Engine::Engine(const std::filesystem::path& directory, int device_index, const std::vector<std::string>& trusted_keys)
    : manifest_(read_manifest(directory, trusted_keys)), state_(manifest_.calls_per_step) {
  using torch::inductor::AOTIModelPackageLoader;
  for (const auto& op : manifest_.native_ops) {
    const auto missing = native_op_missing(op);
    if (!missing.empty())
      throw ManifestError(directory.string() + ": the engines call " + op + ", which cannot run here: " +
                               missing + "; export again with options={'attention': 'sdpa'} for machines without it");
  }
  full_ = std::make_unique<AOTIModelPackageLoader>(manifest_.file("full").string(), "model", false, 1, device_index);
  shallow_ = std::make_unique<AOTIModelPackageLoader>(manifest_.file("shallow").string(), "model", false, 1,
                                                      device_index);
  // What each package accepts comes from the package: the manifest's ranges must be the ones compiled in.
  for (const auto& [part, loader] : {std::pair{"full", full_.get()}, std::pair{"shallow", shallow_.get()}}) {
    const auto metadata = loader->get_metadata();
    const auto found = metadata.find(kRangesKey);
    check_compiled_ranges(manifest_, manifest_.file(part), found == metadata.end() ? "" : found->second);
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
  if (!checked_.count(key)) {
    manifest_.ranges.check(inputs[0].sizes().vec());
    checked_.insert(key);
  }
  return key;
}

at::Tensor Engine::run(std::vector<at::Tensor> inputs) {
  const auto signature = check_inputs(inputs);
  std::optional<double> timestep;
  if (timestep_index_ >= 0 && inputs[timestep_index_].device().is_cpu())
    timestep = inputs[timestep_index_].reshape(-1)[0].item<double>();  // host memory: no device sync
  auto [step, slot] = state_.begin(signature, timestep);
  const auto& schedule = manifest_.schedule;
  if (schedule.calibration) {
    const auto& shape = inputs[0].sizes();
    schedule.calibration->check(step, shape[shape.size() - 2], shape.back(), timestep);
  }
  auto& cache = state_.caches[slot];
  if (!cache || schedule.is_full(step)) {
    auto out = full_->run(inputs);
    state_.end(slot, out.at(1));
    return out.at(0);
  }
  inputs.push_back(*cache);
  auto out = shallow_->run(inputs);
  state_.end(slot, std::nullopt);
  return out.at(0);
}

}  // namespace deepcache
