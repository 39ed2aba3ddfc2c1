// Engine: a verified export's full and shallow AOTInductor packages, run on the exported schedule.
//
// The C++ twin of deepcache_compile/artifacts/engine.py: the same manifest checks, the same dispatch
// (runtime/generation.py), and every input checked against the export's ranges before a package runs
// (AOTInductor itself does not check shapes).
//
//   deepcache::Engine engine("engines/digits-b0");           // throws ManifestError on a bad export
//   at::Tensor eps = engine.run({latents, timestep});         // inputs in the manifest's order
#pragma once

#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <ATen/Tensor.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "generation.h"
#include "manifest.h"

namespace deepcache {

class Engine {
 public:
  // Verifies `directory` (signed by one of `trusted_keys`, Ed25519 PEM files, where any are given) and loads both
  // packages; `device_index` -1 = CPU, else a CUDA device.
  explicit Engine(const std::filesystem::path& directory, int device_index = -1,
                  const std::vector<std::string>& trusted_keys = {});

  // One U-Net call: `inputs` in the manifest's input order (`sample`, `timestep`, ...). Runs the full or the
  // shallow graph by the schedule and returns the predicted sample.
  at::Tensor run(std::vector<at::Tensor> inputs);

  void reset() { state_.reset(); }                          // the next call starts a new generation
  int step() const { return state_.calls / state_.calls_per_step; }
  const std::string& history() const { return state_.history; }
  const Manifest& manifest() const { return manifest_; }

 private:
  std::string check_inputs(std::vector<at::Tensor>& inputs);

  Manifest manifest_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> full_, shallow_;
  GenerationState state_;
  std::set<std::string> checked_;  // signatures whose shapes passed the range check
  int timestep_index_ = -1;
};

}  // namespace deepcache
