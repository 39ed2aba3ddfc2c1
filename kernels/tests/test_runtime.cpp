// Unit tests of the native schedule and generation state (ctest). The schedule against Python's
// Schedule.full_steps over a random sweep, and the engine against the Python engine, are in tests/test_native.py.
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "generation.h"
#include "manifest.h"
#include "schedule.h"

namespace {
int failures = 0;

template <typename A, typename B>
void expect_eq(const A& actual, const B& expected, const std::string& what) {
  if (!(actual == expected)) {
    ++failures;
    std::cerr << "FAIL " << what << "\n";
  }
}

void expect_throws(auto fn, const std::string& fragment, const std::string& what) {
  try {
    fn();
  } catch (const std::exception& err) {
    if (std::string(err.what()).find(fragment) == std::string::npos) {
      ++failures;
      std::cerr << "FAIL " << what << ": message was: " << err.what() << "\n";
    }
    return;
  }
  ++failures;
  std::cerr << "FAIL " << what << ": no exception\n";
}

void test_schedules() {
  using deepcache::Schedule;
  Schedule uniform;
  uniform.interval = 5;
  expect_eq(uniform.full_steps(12), std::vector<int>{0, 5, 10}, "uniform N=5");
  expect_eq(uniform.full_steps(50).size(), size_t{10}, "uniform T=50 N=5 has 10 full steps");

  Schedule nonuniform;  // the non-uniform steps come resolved from the manifest (docs/method.md reference values)
  nonuniform.kind = "nonuniform";
  nonuniform.steps = {0, 5, 9, 13, 17, 21, 26, 31, 37, 43};
  nonuniform.num_inference_steps = 50;
  expect_eq(nonuniform.full_steps(50), nonuniform.steps, "nonuniform T=50 N=5");

  Schedule windows;
  windows.interval = 10;
  windows.always_full_first = 2;
  windows.always_full_last = 3;
  expect_eq(windows.full_steps(20), std::vector<int>{0, 1, 10, 17, 18, 19}, "first/last windows");
  expect_throws([&] { windows.is_full(4); }, "needs the total number of steps", "last window without a total");
  expect_throws([&] { uniform.is_full(-1); }, "is negative", "negative step");

  Schedule explicit_steps;
  explicit_steps.kind = "explicit";
  explicit_steps.steps = {0, 3, 7, 12};
  expect_eq(explicit_steps.full_steps(20), explicit_steps.steps, "explicit");
}

void test_generation_state() {
  deepcache::GenerationState state(2);  // two calls per step (separate CFG calls)
  auto cache = at::zeros({1});
  for (double t : {900.0, 900.0, 800.0, 800.0}) {
    auto [step, slot] = state.begin("sig", t);
    state.end(slot, step == 0 ? std::optional<at::Tensor>(cache) : std::nullopt);
  }
  expect_eq(state.history, std::string("FFSS"), "two slots per step");
  expect_eq(state.calls, 4, "four calls");
  auto [step, slot] = state.begin("sig", 950.0);  // the timestep went up: a new generation
  expect_eq(step, 0, "timestep up resets");
  expect_eq(state.history, std::string(""), "history cleared");
  state.end(slot, cache);
  state.begin("other shape", 940.0);
  expect_eq(state.calls, 0, "signature change resets");
  expect_eq(state.caches[0].has_value(), false, "caches dropped on reset");
}

void test_ranges() {
  deepcache::ShapeRanges ranges{{1, 4}, {8, 32}, {8, 32}, 2};
  ranges.check({4, 1, 32, 8});
  expect_throws([&] { ranges.check({5, 1, 16, 16}); }, "sample batch=5 is outside this export's range 1..4",
                "batch out of range");
  expect_throws([&] { ranges.check({1, 1, 15, 16}); }, "sample height=15 is not a multiple of 2", "odd height");
}
}  // namespace

int main() {
  test_schedules();
  test_generation_state();
  test_ranges();
  std::cout << (failures ? "FAILED " : "passed ") << failures << " failures\n";
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
