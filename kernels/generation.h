// Per-generation state: the C++ twin of deepcache_compile/runtime/generation.py.
//
// A generation is counted in U-Net calls. A new one starts on reset(), when the input signature (the
// shapes and dtypes) changes, or when the timestep goes up. The timestep is read only where it costs no
// device sync (a CPU tensor); for device timesteps the caller calls reset() between generations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace deepcache {

// One slot's forecast inputs (runtime/generation.py's Extrapolation): the cached tensor's change per step between
// its last two full steps, and the step of the last one.
struct Extrapolation {
  std::optional<at::Tensor> cache, slope;
  int step = 0;

  void full(const at::Tensor& value, int at_step) {
    slope = cache ? (value - *cache).div_(at_step - step) : at::zeros_like(value);  // one full step: plain reuse
    cache = value;
    step = at_step;
  }
  // (slope, steps since the last full step) for a shallow step.
  std::pair<at::Tensor, at::Tensor> inputs(int at_step) const {
    return {*slope, at::full({}, double(at_step - step), slope->options())};
  }
};

struct GenerationState {
  explicit GenerationState(int calls_per_step) : calls_per_step(calls_per_step) { reset(); }

  void reset() {
    calls = 0;
    caches.assign(calls_per_step, std::nullopt);
    probes.assign(calls_per_step, std::nullopt);
    extrapolations.assign(calls_per_step, Extrapolation{});
    drift.assign(calls_per_step, 0.0);
    shallow_run.assign(calls_per_step, 0);
    device_states.assign(calls_per_step, {});
    decided.clear();
    history.clear();
    last_timestep.reset();
  }

  // Registers a call; returns (step, slot), resetting first if the call starts a new generation.
  std::pair<int, int> begin(const std::string& call_signature, std::optional<double> timestep) {
    if (call_signature != signature) {
      signature = call_signature;
      reset();
    } else if (timestep && last_timestep && *timestep > *last_timestep) {
      reset();  // the timestep went up: a new schedule
    }
    last_timestep = timestep;
    return {calls / calls_per_step, calls % calls_per_step};
  }

  // Records a finished call: a full step passes its new cache, a shallow step nothing.
  void end(int slot, std::optional<at::Tensor> cache) {
    resolve();
    history.push_back(cache ? 'F' : 'S');
    if (cache) caches[slot] = std::move(cache);
    ++calls;
  }

  // Records a call decided on the device: its decision stays a tensor until the history is read.
  void end_on_device(at::Tensor full) {
    decided.push_back(std::move(full));
    ++calls;
  }

  // The history with the device decisions read (a sync on a GPU: only when asked).
  const std::string& resolve() {
    for (const auto& full : decided) history.push_back(full.item<bool>() ? 'F' : 'S');
    decided.clear();
    return history;
  }

  int calls_per_step;
  int calls = 0;
  std::vector<std::optional<at::Tensor>> caches;
  // Adaptive refresh, per slot: the probe of the step before, the drift since the last full step, and how many
  // shallow steps ran in a row.
  std::vector<std::optional<at::Tensor>> probes;
  std::vector<double> drift;
  std::vector<int> shallow_run;
  std::vector<Extrapolation> extrapolations;  // forecast, per slot
  // A step package's policy tensors per slot: (cache, reference, drift, run); empty before the first step.
  std::vector<std::vector<at::Tensor>> device_states;
  std::vector<at::Tensor> decided;  // device decisions not read yet (resolve())
  std::string history;  // one letter per call of this generation: F full, S shallow
  std::string signature;
  std::optional<double> last_timestep;
};

}  // namespace deepcache
