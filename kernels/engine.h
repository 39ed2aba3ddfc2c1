// Engine: a verified export's full and shallow AOTInductor packages, run on the exported schedule.
//
// The C++ twin of deepcache_compile/artifacts/engine.py: the same manifest checks, the same dispatch
// (runtime/generation.py), and every input checked against the export's ranges before a package runs
// (AOTInductor itself does not check shapes).
//
//   deepcache::Engine engine("engines/digits-b0");           // throws ManifestError on a bad export
//   at::Tensor eps = engine.run({latents, timestep});         // inputs in the manifest's order
//
// Concurrent generations share one engine (one copy of the weights): each holds a Generation of its own and
// passes it to run(); run() is thread-safe for distinct generations. With `runners` > 1, up to that many calls
// run at once (AOTInductor model instances sharing the weights); otherwise they take turns.
//
//   auto generation = engine.generation();                    // one per concurrent request
//   at::Tensor eps = engine.run(*generation, {latents, timestep});
#pragma once

#include <filesystem>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <ATen/Tensor.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "generation.h"
#include "manifest.h"

namespace deepcache {

// One generation's state: its step counter, caches and history (generation.h). Used by one thread at a time.
using Generation = GenerationState;

class Engine {
 public:
  // Verifies `directory` (signed by one of `trusted_keys`, Ed25519 PEM files, where any are given) and loads both
  // packages; `device_index` -1 = CPU, else a CUDA device.
  explicit Engine(const std::filesystem::path& directory, int device_index = -1,
                  const std::vector<std::string>& trusted_keys = {}, int runners = 1);

  // One U-Net call: `inputs` in the manifest's input order (`sample`, `timestep`, ...). Runs the full or the
  // shallow graph by the schedule and returns the predicted sample.
  // This call uses the engine's own generation (for one caller at a time).
  at::Tensor run(std::vector<at::Tensor> inputs) { return run(state_, std::move(inputs)); }
  // The same, in `generation` (thread-safe across distinct generations).
  at::Tensor run(Generation& generation, std::vector<at::Tensor> inputs);

  // A fresh generation for concurrent use.
  std::unique_ptr<Generation> generation() const { return std::make_unique<Generation>(manifest_.calls_per_step); }

  void reset() { state_.reset(); }                          // the next call starts a new generation
  int step() const { return state_.calls / state_.calls_per_step; }
  const std::string& history() { return state_.resolve(); }
  const Manifest& manifest() const { return manifest_; }

 private:
  // Brings the inputs to the exported dtypes and ranks, checks them, pads a batch below pad_batch.
  std::string check_inputs(std::vector<at::Tensor>& inputs);
  // One call of checked inputs: the step package, adaptive refresh or the full/shallow pair.
  at::Tensor run_checked(Generation& generation, const std::string& signature, std::vector<at::Tensor> inputs);
  // Adaptive refresh: head -> [deep] -> tail, full where the probe's drift says so.
  at::Tensor run_adaptive(Generation& generation, int slot, std::vector<at::Tensor> inputs);
  // A step package: the decision and the policy's state stay on the device.
  at::Tensor run_on_device(Generation& generation, int slot, std::vector<at::Tensor> inputs);

  Manifest manifest_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> full_, shallow_, head_, deep_, tail_, step_;
  GenerationState state_;
  std::mutex checked_mutex_;
  std::set<std::string> checked_;  // signatures whose shapes passed the range check
  int timestep_index_ = -1;
};

}  // namespace deepcache
