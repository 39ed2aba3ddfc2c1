// Which steps of a generation run the full U-Net: the C++ twin of deepcache_compile/schedule.py.
//
// Steps are U-Net calls per call slot, counted from 0; step 0 is always full. The non-uniform schedule's
// steps are resolved at export time (the reference code's complex-power arithmetic runs once, in Python) and
// stored in the manifest, so here it is a list like the explicit one.
#pragma once

#include <algorithm>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace deepcache {

enum class Step { Full, Shallow };

// What a calibrated plan was made for (schedule.Calibration): a generation that does not fit it is refused with
// Python's messages, never truncated or stretched.
struct Calibration {
  std::vector<double> timesteps;  // one per step of the calibration run
  int64_t height = 0, width = 0;  // its sample size

  // Throws std::invalid_argument where step `step` (of a generation whose samples are height x width, at
  // `timestep` where known) does not fit: any step past the last, the size at step 0, the timestep at steps 0, 1.
  void check(int step, int64_t h, int64_t w, std::optional<double> timestep) const {
    const auto total = static_cast<int>(timesteps.size());
    if (step >= total)
      throw std::invalid_argument("this generation runs more than the " + std::to_string(total) +
                                  " steps the calibrated plan was made for: calibrate again with num_inference_steps=" +
                                  std::to_string(step + 1) + " or more");
    if (step == 0 && (h != height || w != width))
      throw std::invalid_argument("sample size (" + std::to_string(h) + ", " + std::to_string(w) +
                                  ") differs from the calibration run's (" + std::to_string(height) + ", " +
                                  std::to_string(width) + "): calibrate again at this resolution");
    if (step < 2 && timestep && *timestep != timesteps[step])
      throw std::invalid_argument("step " + std::to_string(step) + " has timestep " + g(*timestep) +
                                  ", the calibration run had " + g(timesteps[step]) + ": the plan was made for " +
                                  std::to_string(total) + " steps of another schedule (a plan is not truncated or " +
                                  "stretched); calibrate again with this step count and scheduler");
  }

 private:
  static std::string g(double value) {  // Python's format(value, "g")
    char text[32];
    std::snprintf(text, sizeof text, "%g", value);
    return text;
  }
};

struct Schedule {
  std::string kind = "uniform";  // "uniform", "nonuniform" or "explicit"
  int interval = 3;
  std::vector<int> steps;        // explicit full steps, or the non-uniform ones resolved for its total
  std::optional<int> num_inference_steps;
  int always_full_first = 0;
  int always_full_last = 0;
  std::optional<Calibration> calibration;  // a calibrated plan's

  bool needs_total() const { return kind == "nonuniform" || always_full_last > 0; }

  bool is_full(int step, std::optional<int> total = std::nullopt) const {
    if (step < 0) throw std::invalid_argument("step=" + std::to_string(step) + " is negative: steps count from 0");
    if (!total) total = num_inference_steps;
    if (!total && needs_total())
      throw std::invalid_argument("the " + kind + " schedule with always_full_last=" +
                                  std::to_string(always_full_last) +
                                  " needs the total number of steps: pass total");
    if (step < always_full_first || (total && step >= *total - always_full_last)) return true;
    if (kind == "uniform") return step % interval == 0;
    return std::binary_search(steps.begin(), steps.end(), step);
  }

  Step step_kind(int step, std::optional<int> total = std::nullopt) const {
    return is_full(step, total) ? Step::Full : Step::Shallow;
  }

  std::vector<int> full_steps(int total) const {
    std::vector<int> out;
    for (int s = 0; s < total; ++s)
      if (is_full(s, total)) out.push_back(s);
    return out;
  }
};

}  // namespace deepcache
