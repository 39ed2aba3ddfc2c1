// Which steps of a generation run the full U-Net: the C++ twin of deepcache_compile/schedule.py.
//
// Steps are U-Net calls per call slot, counted from 0; step 0 is always full. The non-uniform schedule's
// steps are resolved at export time (the reference code's complex-power arithmetic runs once, in Python) and
// stored in the manifest, so here it is a list like the explicit one.
#pragma once

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace deepcache {

enum class Step { Full, Shallow };

struct Schedule {
  std::string kind = "uniform";  // "uniform", "nonuniform" or "explicit"
  int interval = 3;
  std::vector<int> steps;        // explicit full steps, or the non-uniform ones resolved for its total
  std::optional<int> num_inference_steps;
  int always_full_first = 0;
  int always_full_last = 0;

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
